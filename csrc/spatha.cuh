// Spatha-style V:N:M (N = 2) sparse x dense matmul for venom_hf.
//
//   y[t, r] = sum_k x[t, k] * W[r, k]  (+ bias[r])      i.e. y = x @ W^T
//
// W (R x K) is stored in the canonical packed layout of docs/format.md and read as is:
//   values  (Rp, Gp, 2)  fp16/bf16   the 2 kept values of row r in column group g
//   columns (Rb, Gp, 4)  uint8       the 4 columns kept by row block b = r / V in group g
//   meta    (Rp, Gp)     uint8       pos0 | pos1 << 2 (the 2:4 nibble of row r in group g)
// x is (T, K) with unit column stride and row stride ldx. The v2 kernel (spatha_spmm: decode and
// <= 64 tokens) reads it as is; the v3 prefill kernel (spatha_spmm_kt, further below) reads a K-major
// copy x^T made by spatha_transpose once per call (an explicit prefill strategy, docs/perf-notes.md).
//
// One mma.sp.m16n8k32 "k-step" consumes 8 column groups (8*M columns of x, 32 selected ones):
//   A = 16 weight rows x 16 kept values (rows = output features),
//   B = 32 selected columns x 8 tokens, gathered from x,
//   D = 16 output features x 8 tokens, fp32.
// mma k-slot j (4 k-rows) <-> group 8s+j; k-row 4j+i <-> selected column columns[b, 8s+j, i].
//
// Data movement (per CTA, per window of KW k-steps, multi-stage cp.async pipeline):
//   * x: the contiguous span x[n0:n0+BN, 8*KW*M columns] is copied into shared memory with 16-byte
//     cp.async (zero-filled beyond K; rows beyond T are zeroed once). Each warp then picks the
//     selected columns of *its own* V-block out of the span with 2-byte shared loads. So V is a
//     run-time value (any multiple of the warp tile WM), and a CTA may span several V-blocks.
//   * values / meta / columns: 16-byte (meta: 8-byte) cp.async of whole row windows (32*KW bytes of
//     values per row, i.e. full 128-byte lines for KW = 4), read per k-step with conflict-free
//     4-byte shared loads. (v1 loaded them straight from global with 4-byte loads: 8 lines per
//     instruction, L1TEX-bound at 0.19x of cuBLAS; see docs/perf-notes.md.)
// Epilogue: bias added in fp32, converted, staged through shared memory, 16-byte coalesced
// stores. Split-K: each split writes fp32 partials to a workspace, reduced by spatha_splitk_reduce.
//
// Further below, each with its own header: the kt prefill kernel (v3), the decode kernels (v4 stream, v5
// ring, v7 tma on sm_90+) and the sm_90a prefill kernel on sparse wgmma (v8, spatha_spmm_wg), which reads
// the weight as 2:4 through a per-device chunk layout (docs/format.md, last section).
//
// No torch or CUDA headers are needed (NVRTC compiles this file alone).
#pragma once

namespace venom {

struct SpmmParams {
  const void* x;                  // (T, ldx) activations, fp16/bf16
  const void* values;             // (Rp, Gp, 2)
  const unsigned char* columns;   // (Rb, Gp, 4)
  const unsigned char* meta;      // (Rp, Gp)
  const void* bias;               // (R,) or nullptr
  void* y;                        // (T, ldy) output
  float* ws;                      // (nsplit, T, R) fp32 partials when nsplit > 1
  long long ldx;
  long long ldy;
  int T, K, R, Rp, Gp, V, M;
  int steps_per_split;            // k-steps (8 groups each) per split
  int nsplit;
  int* counters;                  // stream kernel, nsplit > 1: one arrival counter per row CTA (zero
                                  // between launches: the last CTA of each row group resets its own)
};

struct ReduceParams {
  const float* ws;                // (nsplit, T, R)
  const void* bias;
  void* y;
  long long ldy;
  int T, R, nsplit;
};

// ---------------------------------------------------------------------------------------------
// small PTX helpers
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; bytes < 16 zero-fills the rest (bytes == 0: no read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ unsigned ldg_u32(const void* p) {
  unsigned v;
  asm volatile("ld.global.nc.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ float to_float(unsigned short h, bool bf16) {
  if (bf16) return __uint_as_float(static_cast<unsigned>(h) << 16);
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
template <bool BF16>
__device__ __forceinline__ unsigned short from_float(float f) {
  unsigned short h;
  if (BF16)
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// 4 metadata bytes (one nibble each, groups j..j+3) -> 16 bits, nibble i = byte i.
__device__ __forceinline__ unsigned compact_nibbles(unsigned w) {
  w &= 0x0F0F0F0Fu;
  w = (w | (w >> 4)) & 0x00FF00FFu;
  w = (w | (w >> 8)) & 0x0000FFFFu;
  return w;
}

// D += A(16x32, 2:4 sparse) * B(32x8), fp32 accumulate. SEL: sparsity selector, i.e. which lane pair of
// each quad supplies the metadata (0: threads 0,1; 1: threads 2,3).
template <bool BF16, int SEL = 0>
__device__ __forceinline__ void mma_sp_16832(float* d, const unsigned* a, const unsigned* b,
                                             unsigned e) {
#define VENOM_MMA_SP "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32."
  if (BF16) {
    asm volatile(VENOM_MMA_SP "bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, "
                 "{%0,%1,%2,%3}, %12, %13;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
                   "r"(b[3]), "r"(e), "n"(SEL));
  } else {
    asm volatile(VENOM_MMA_SP "f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, "
                 "{%0,%1,%2,%3}, %12, %13;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
                   "r"(b[3]), "r"(e), "n"(SEL));
  }
#undef VENOM_MMA_SP
}

// 8-byte async copy (for the metadata rows, which are only 8-byte aligned).
__device__ __forceinline__ void cp_async_8(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(bytes));
}

// ---------------------------------------------------------------------------------------------
// Epilogue shared by the kernels: acc (FM x FN mma tiles of 16 x 8, fp32) of warp (wm, wn) of the
// CTA tile at (m0 rows, n0 tokens). Split-K (p.nsplit > 1): fp32 partials straight from registers into
// ws[split][t][r]. Else: + bias in fp32, convert, stage [BN][BM+8] through shared memory (the caller's
// pipeline buffers: all cp.async groups must be drained), 16-byte coalesced stores.
// ---------------------------------------------------------------------------------------------
// The multi-stage cp.async pipeline shared by both SpMM kernels: windows of KW k-steps are loaded
// STAGES-1 ahead into a ring of shared-memory stages; the wait leaves STAGES-2 groups in flight, so the
// stage being overwritten is always one whose compute finished before the preceding __syncthreads.
template <int STAGES, int KW, class LoadStage, class ComputeStep>
__device__ __forceinline__ void run_pipeline(int nwin, int nsteps, LoadStage& load_stage, ComputeStep& compute_step) {
#pragma unroll
  for (int w = 0; w < STAGES - 1; ++w) {
    if (w < nwin) load_stage(w, w);
    cp_async_commit();
  }
  for (int w = 0; w < nwin; ++w) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int nx = w + STAGES - 1;
    if (nx < nwin) load_stage(nx, nx % STAGES);
    cp_async_commit();
    const int st = w % STAGES;
    const int ns = min(KW, nsteps - w * KW);
#pragma unroll
    for (int s2 = 0; s2 < KW; ++s2)
      if (s2 < ns) compute_step(st, s2);
  }
  cp_async_wait<0>();
}

template <bool BF16, int WM, int WN, int WARPS_M, int WARPS_N>
__device__ __forceinline__ void store_tile(float (&acc)[WM / 16][WN / 8][4], const SpmmParams& p,
                                           int m0, int n0, int wm, int wn,
                                           unsigned char* smem_raw) {
  constexpr int FM = WM / 16;
  constexpr int FN = WN / 8;
  constexpr int BM = WM * WARPS_M;
  constexpr int BN = WN * WARPS_N;
  constexpr int NT = WARPS_M * WARPS_N * 32;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int tig = lane & 3;
  const int wrow_nominal = m0 + wm * WM;

  const bool has_bias = p.bias != nullptr;
  const unsigned short* bias16 = reinterpret_cast<const unsigned short*>(p.bias);
  if (p.nsplit > 1) {
    float* ws = p.ws + (long long)blockIdx.z * p.T * p.R;
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
      for (int j = 0; j < FN; ++j) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int r = wrow_nominal + i * 16 + g + (k >> 1) * 8;
          const int t = n0 + wn * WN + j * 8 + 2 * tig + (k & 1);
          if (r < p.R && t < p.T) ws[(long long)t * p.R + r] = acc[i][j][k];
        }
      }
    }
    return;
  }

  __syncthreads();  // all warps are done with the pipeline buffers: reuse shared memory
  constexpr int YP = BM + 8;  // staged tile [BN][BM+8] in the output dtype
  unsigned short* ys = reinterpret_cast<unsigned short*>(smem_raw);
#pragma unroll
  for (int i = 0; i < FM; ++i) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int rl = wm * WM + i * 16 + g + hh * 8;
      const int r = m0 + rl;
      const float bv = (has_bias && r < p.R) ? to_float(bias16[r], BF16) : 0.f;
#pragma unroll
      for (int j = 0; j < FN; ++j) {
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const int tl = wn * WN + j * 8 + 2 * tig + k;
          ys[tl * YP + rl] = from_float<BF16>(acc[i][j][hh * 2 + k] + bv);
        }
      }
    }
  }
  __syncthreads();
  unsigned short* y16 = reinterpret_cast<unsigned short*>(p.y);
  const bool vec_ok = ((p.R & 7) == 0) && ((p.ldy & 7) == 0) &&
                      ((reinterpret_cast<unsigned long long>(p.y) & 15) == 0);
  constexpr int CPR = BM / 8;  // 16-byte chunks per staged row
  for (int i = tid; i < BN * CPR; i += NT) {
    const int tl = i / CPR;
    const int c8 = (i - tl * CPR) * 8;
    const int t = n0 + tl;
    const int r = m0 + c8;
    if (t >= p.T || r >= p.R) continue;
    unsigned short* dst = y16 + (long long)t * p.ldy + r;
    const unsigned short* src = ys + tl * YP + c8;
    if (vec_ok && r + 8 <= p.R) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int k = 0; k < 8 && r + k < p.R; ++k) dst[k] = src[k];
    }
  }
}

// Shared-memory layout of one pipeline stage (a window of KW k-steps = 8*KW column groups).
template <int WM, int WN, int WARPS_M, int WARPS_N, int KW>
struct StageLayout {
  static constexpr int BM = WM * WARPS_M;
  static constexpr int BN = WN * WARPS_N;
  static constexpr int AP = KW * 32 + 16;  // bytes per weight row of values (+16: no bank conflicts)
  static constexpr int MP = KW * 8 + 8;    // bytes per weight row of metadata
  static constexpr int CP = KW * 32;       // bytes of column indices per warp row-block
  __device__ __forceinline__ static int xpitch(int M) { return KW * 8 * M + 8; }  // halves per token
  __device__ __forceinline__ static int bytes(int M) {
    return BN * xpitch(M) * 2 + BM * AP + BM * MP + WARPS_M * CP;
  }
};

// ---------------------------------------------------------------------------------------------
// main kernel (v2)
//   WM x WN   warp tile (WM in {16,32,64}: weight rows; WN multiple of 8: tokens)
//   WARPS_M x WARPS_N warps per CTA; CTA tile BM = WM*WARPS_M rows, BN = WN*WARPS_N tokens
//   STAGES    cp.async pipeline depth, in windows of KW k-steps
//   KW        k-steps (of 8 groups) per window: values of a row per window = 32*KW contiguous bytes
// Everything a CTA reads goes through shared memory with cp.async: the x span
// [BN tokens x 8*KW*M columns], the values [BM x 32*KW B], metadata [BM x 8*KW B] and the column
// indices of each warp's V-block. Per k-step each warp reads its A fragments with conflict-free
// 4-byte loads and gathers its B fragments (its own V-block's selected columns) with 2-byte loads.
// Run-time requirements (checked on the host): V % WM == 0, V % 16 == 0, Gp % 8 == 0,
//   ldx % 8 == 0 and x 16-byte aligned, values/columns 16-byte and meta 8-byte aligned.
// Dynamic shared memory: max(STAGES * StageLayout::bytes(M), BN*(BM+8)*2).
// ---------------------------------------------------------------------------------------------
template <bool BF16, int WM, int WN, int WARPS_M, int WARPS_N, int STAGES, int KW>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32)
    spatha_spmm(const SpmmParams p) {
  using L = StageLayout<WM, WN, WARPS_M, WARPS_N, KW>;
  constexpr int FM = WM / 16;
  constexpr int FN = WN / 8;
  constexpr int BM = L::BM;
  constexpr int BN = L::BN;
  constexpr int NT = WARPS_M * WARPS_N * 32;
  static_assert(WM % 16 == 0 && WN % 8 == 0, "warp tile");
  static_assert(STAGES >= 2, "stages");

  extern __shared__ __align__(16) unsigned char smem_raw[];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp % WARPS_M;
  const int wn = warp / WARPS_M;
  const int g = lane >> 2;
  const int tig = lane & 3;
  const int h = tig >> 1;
  const int pp = tig & 1;

  const int m0 = blockIdx.x * BM;
  const int n0 = blockIdx.y * BN;
  const int s_begin = blockIdx.z * p.steps_per_split;
  const int s_end = min(p.Gp / 8, s_begin + p.steps_per_split);
  const int nsteps = s_end - s_begin;
  const int nwin = (nsteps + KW - 1) / KW;

  const int M = p.M;
  const int XP = L::xpitch(M);
  const int stage_bytes = L::bytes(M);
  const int rows_valid = max(0, min(BN, p.T - n0));

  const unsigned char* vals8 = reinterpret_cast<const unsigned char*>(p.values);
  const unsigned short* x16 = reinterpret_cast<const unsigned short*>(p.x);

  // Zero the shared rows of tokens >= T once (the copies never write them).
  if (rows_valid < BN) {
    const int per_row = XP / 8;
    const int nrow = BN - rows_valid;
    for (int i = tid; i < STAGES * nrow * per_row; i += NT) {
      const int st = i / (nrow * per_row);
      const int rem = i - st * nrow * per_row;
      const int row = rows_valid + rem / per_row;
      const int ch = rem - (row - rows_valid) * per_row;
      *reinterpret_cast<uint4*>(smem_raw + st * stage_bytes + (row * XP + ch * 8) * 2) =
          make_uint4(0, 0, 0, 0);
    }
  }

  const int xcpr = KW * M;  // 16-byte x chunks per token row per window
  const bool xcpr_pow2 = (xcpr & (xcpr - 1)) == 0;
  const int xcpr_shift = __ffs(xcpr) - 1;

  auto load_stage = [&](int w, int st) {
    unsigned char* base = smem_raw + st * stage_bytes;
    unsigned short* xs = reinterpret_cast<unsigned short*>(base);
    unsigned char* as = base + BN * XP * 2;
    unsigned char* ms = as + BM * L::AP;
    unsigned char* cs = ms + BM * L::MP;
    const int sw = s_begin + w * KW;
    const int g0 = 8 * sw;
    // x span
    const int col0 = g0 * M;
    for (int i = tid; i < rows_valid * xcpr; i += NT) {
      const int row = xcpr_pow2 ? (i >> xcpr_shift) : i / xcpr;
      const int ch = i - row * xcpr;
      const int col = col0 + ch * 8;
      const int valid = p.K - col;
      const int bytes = valid >= 8 ? 16 : (valid > 0 ? valid * 2 : 0);
      const unsigned short* src = bytes ? x16 + (long long)(n0 + row) * p.ldx + col : x16;
      cp_async_16(xs + row * XP + ch * 8, src, bytes);
    }
    // values: KW*2 chunks of 16 B (4 groups) per row
    for (int i = tid; i < BM * KW * 2; i += NT) {
      const int row = i / (KW * 2);
      const int c = i - row * (KW * 2);
      const int grow = min(m0 + row, p.Rp - 1);
      const int gg = g0 + 4 * c;
      const bool ok = gg < p.Gp;
      const unsigned char* src = ok ? vals8 + ((long long)grow * p.Gp + gg) * 4 : vals8;
      cp_async_16(as + row * L::AP + c * 16, src, ok ? 16 : 0);
    }
    // metadata: KW chunks of 8 B (8 groups) per row
    for (int i = tid; i < BM * KW; i += NT) {
      const int row = i / KW;
      const int c = i - row * KW;
      const int grow = min(m0 + row, p.Rp - 1);
      const int gg = g0 + 8 * c;
      const bool ok = gg < p.Gp;
      const unsigned char* src = ok ? p.meta + (long long)grow * p.Gp + gg : p.meta;
      cp_async_8(ms + row * L::MP + c * 8, src, ok ? 8 : 0);
    }
    // column indices of each warp row's V-block: KW*2 chunks of 16 B
    for (int i = tid; i < WARPS_M * KW * 2; i += NT) {
      const int wr = i / (KW * 2);
      const int c = i - wr * (KW * 2);
      const int blk = min(m0 + wr * WM, p.Rp - WM) / p.V;
      const int gg = g0 + 4 * c;
      const bool ok = gg < p.Gp;
      const unsigned char* src = ok ? p.columns + ((long long)blk * p.Gp + gg) * 4 : p.columns;
      cp_async_16(cs + wr * L::CP + c * 16, src, ok ? 16 : 0);
    }
  };

  float acc[FM][FN][4];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[i][j][k] = 0.f;

  auto compute_step = [&](int st, int s2) {
    const unsigned char* base = smem_raw + st * stage_bytes;
    const unsigned short* xs = reinterpret_cast<const unsigned short*>(base);
    const unsigned char* as = base + BN * XP * 2;
    const unsigned char* ms = as + BM * L::AP;
    const unsigned char* cs = ms + BM * L::MP;
    const unsigned* cw = reinterpret_cast<const unsigned*>(cs + wm * L::CP) + s2 * 8;
    int off[4][2];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const unsigned w = cw[2 * q + h] >> (16 * pp);
      const int gb = (s2 * 8 + 2 * q + h) * M;
      off[q][0] = gb + (w & 0xFF);
      off[q][1] = gb + ((w >> 8) & 0xFF);
    }
    unsigned a[FM][4];
    unsigned e[FM];
#pragma unroll
    for (int i = 0; i < FM; ++i) {
      const int row = wm * WM + i * 16 + g;
      const unsigned* r0 = reinterpret_cast<const unsigned*>(as + row * L::AP) + s2 * 8;
      const unsigned* r1 = reinterpret_cast<const unsigned*>(as + (row + 8) * L::AP) + s2 * 8;
      a[i][0] = r0[tig];
      a[i][1] = r1[tig];
      a[i][2] = r0[4 + tig];
      a[i][3] = r1[4 + tig];
      const unsigned m0w = *reinterpret_cast<const unsigned*>(ms + row * L::MP + s2 * 8 + 4 * pp);
      const unsigned m1w = *reinterpret_cast<const unsigned*>(ms + (row + 8) * L::MP + s2 * 8 + 4 * pp);
      e[i] = compact_nibbles(m0w) | (compact_nibbles(m1w) << 16);
    }
    const unsigned short* xw = xs + (wn * WN + g) * XP;
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      const unsigned short* xr = xw + j * 8 * XP;
      unsigned b[4];
#pragma unroll
      for (int q = 0; q < 4; ++q)
        b[q] = static_cast<unsigned>(xr[off[q][0]]) | (static_cast<unsigned>(xr[off[q][1]]) << 16);
#pragma unroll
      for (int i = 0; i < FM; ++i) mma_sp_16832<BF16>(acc[i][j], a[i], b, e[i]);
    }
  };

  run_pipeline<STAGES, KW>(nwin, nsteps, load_stage, compute_step);

  store_tile<BF16, WM, WN, WARPS_M, WARPS_N>(acc, p, m0, n0, wm, wn, smem_raw);
}

// =============================================================================================
// v3 prefill path (the original Spatha orientation): x^T (K-major) + 16-byte row gathers.
//
// 1. spatha_transpose: xT[k][t] = x[t][k] (K rows, row stride ldt = roundup(T, 8) elements; the
//    padding tokens T..ldt-1 are written as zeros). One extra T*K*4 bytes of traffic per call.
// 2. spatha_spmm_kt: a CTA owns BM rows of ONE V-block (V % BM == 0) and BN tokens. Per k-step the
//    32 selected columns of its V-block name 32 rows of xT; their BN-token slices are copied with
//    16-byte cp.async into a compact B tile [32 k-rows][BN tokens] (only selected data moves, and
//    x traffic no longer grows with M), read with ldmatrix.x4.trans (4 conflict-free wavefronts per
//    32x8 B fragment). Values are read with ldmatrix.x4 (one instruction per 16x32 A fragment).
//    The V-block's column indices for the CTA's whole k-range are staged once in shared memory
//    (steps_per_split * 32 bytes), so the gather addresses never wait on a global load.
// =============================================================================================
struct TransposeParams {
  const void* x;   // (T, ldx)
  void* xt;        // (Kp, ldt)
  long long ldx;
  long long ldt;
  int T, K;
  int Kp;          // rows written (>= K; rows K..Kp-1 are zeros, so the kt gathers need no bounds checks)
};

// 64 (k) x 64 (token) tile per 256-thread CTA; 4-byte global loads/stores, coalesced (128 B / warp).
__global__ void __launch_bounds__(256) spatha_transpose(const TransposeParams p) {
  __shared__ unsigned short s[64][66];  // [token][k], pitch 33 words
  const int k0 = blockIdx.x * 64;
  const int t0 = blockIdx.y * 64;
  const unsigned short* x = reinterpret_cast<const unsigned short*>(p.x);
  for (int i = threadIdx.x; i < 64 * 32; i += 256) {
    const int t = i >> 5;
    const int kw = i & 31;
    const int k = k0 + 2 * kw;
    const int tt = t0 + t;
    unsigned v = 0;
    if (tt < p.T) {
      const unsigned short* src = x + (long long)tt * p.ldx + k;
      if (k + 1 < p.K)
        v = *reinterpret_cast<const unsigned*>(src);  // ldx % 8 == 0, x 16-byte aligned, k even
      else if (k < p.K)
        v = src[0];
    }
    *reinterpret_cast<unsigned*>(&s[t][2 * kw]) = v;
  }
  __syncthreads();
  unsigned short* xt = reinterpret_cast<unsigned short*>(p.xt);
  for (int i = threadIdx.x; i < 64 * 32; i += 256) {
    const int k = i >> 5;
    const int tw = i & 31;
    const int kk = k0 + k;
    const int tt = t0 + 2 * tw;
    if (kk < p.Kp && tt < p.ldt) {
      const unsigned v = static_cast<unsigned>(s[2 * tw][k]) | (static_cast<unsigned>(s[2 * tw + 1][k]) << 16);
      *reinterpret_cast<unsigned*>(xt + (long long)kk * p.ldt + tt) = v;
    }
  }
}

__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// Shared memory of the kt kernel: [column indices: cbytes][STAGES x stage].
template <int WM, int WN, int WARPS_M, int WARPS_N, int KW>
struct KtLayout {
  static constexpr int BM = WM * WARPS_M;
  static constexpr int BN = WN * WARPS_N;
  static constexpr int BP = BN + 8;        // halves per k-row of the B tile (+16 B: no bank conflicts)
  static constexpr int AP = KW * 32 + 16;  // bytes per weight row of values
  static constexpr int MP = KW * 8 + 8;    // bytes per weight row of metadata
  static constexpr int B_BYTES = KW * 32 * BP * 2;
  static constexpr int STAGE = B_BYTES + BM * AP + BM * MP;
  __device__ __forceinline__ static int cbytes(int steps) { return ((steps * 32 + 127) / 128) * 128; }
};

// p.x = xT (K rows, p.ldx = ldt elements per row, ldt % 8 == 0, 16-byte aligned).
// Run-time requirements (host): V % BM == 0, Gp % 8 == 0, steps_per_split % KW == 0,
//   values/columns 16-byte and meta 8-byte aligned.
// Dynamic shared memory: max(cbytes(steps_per_split) + STAGES * STAGE, BN*(BM+8)*2).
template <bool BF16, int WM, int WN, int WARPS_M, int WARPS_N, int STAGES, int KW>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32)
    spatha_spmm_kt(const SpmmParams p) {
  using L = KtLayout<WM, WN, WARPS_M, WARPS_N, KW>;
  constexpr int FM = WM / 16;
  constexpr int FN = WN / 8;
  constexpr int BM = L::BM;
  constexpr int BN = L::BN;
  constexpr int NT = WARPS_M * WARPS_N * 32;
  constexpr int CPR = BN / 8;  // 16-byte chunks per gathered k-row
  static_assert(WM % 16 == 0 && WN % 8 == 0, "warp tile");
  static_assert((CPR & (CPR - 1)) == 0, "BN / 8 must be a power of two");
  static_assert(STAGES >= 2, "stages");

  extern __shared__ __align__(16) unsigned char smem_raw[];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp % WARPS_M;
  const int wn = warp / WARPS_M;
  const int g = lane >> 2;
  const int tig = lane & 3;
  const int pp = tig & 1;
  const int lq = lane >> 3;  // ldmatrix: matrix this lane addresses
  const int lr = lane & 7;   // ldmatrix: row in that matrix

  const int m0 = blockIdx.x * BM;
  const int n0 = blockIdx.y * BN;
  const int s_begin = blockIdx.z * p.steps_per_split;
  const int s_end = min(p.Gp / 8, s_begin + p.steps_per_split);
  const int nsteps = s_end - s_begin;
  const int nwin = (nsteps + KW - 1) / KW;
  const int M = p.M;
  const int blk = m0 / p.V;

  const unsigned char* vals8 = reinterpret_cast<const unsigned char*>(p.values);
  const unsigned short* xt = reinterpret_cast<const unsigned short*>(p.x);
  unsigned char* cs = smem_raw;  // column indices of this CTA's k-range
  unsigned char* stages = smem_raw + L::cbytes(p.steps_per_split);

  // column indices of the V-block for all nsteps k-steps: 32 bytes per k-step
  {
    const unsigned char* src = p.columns + ((long long)blk * p.Gp + 8 * s_begin) * 4;
    for (int i = tid; i < nsteps * 2; i += NT) cp_async_16(cs + i * 16, src + i * 16, 16);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
  }

  auto load_stage = [&](int w, int st) {
    unsigned char* base = stages + st * L::STAGE;
    unsigned short* bs = reinterpret_cast<unsigned short*>(base);
    unsigned char* as = base + L::B_BYTES;
    unsigned char* ms = as + BM * L::AP;
    const int sw = w * KW;              // first local k-step of the window
    const int g0 = 8 * (s_begin + sw);  // first global group of the window
    const int nvalid = min(KW, nsteps - sw);
    if (nvalid == KW) {
      // Full window (all but possibly the last): x^T has Gp*M rows and ldt % BN == 0 (host), so no
      // gather needs a bounds check; each thread owns one 16-byte token chunk and every NT/CPR-th k-row
      // (compile-time trip counts: ~5 instructions per gather instead of ~25 in the generic loop).
      constexpr int RPP = NT / CPR;  // k-rows per pass of the CTA
      static_assert(NT % CPR == 0 && (KW * 32) % RPP == 0, "kt gather passes");
      // 32-bit element offsets: the host keeps Kp * ldt < 2^31
      static_assert(RPP <= 32 && 32 % RPP == 0 && RPP % 4 == 0, "kt gather rows per pass");
      const int ch = tid & (CPR - 1);
      const int kr0 = tid / CPR;  // < RPP: k-row kr0 + j*RPP = k-step (j*RPP)/32, row kr0 + (j*RPP)%32
      const unsigned ldt2 = static_cast<unsigned>(p.ldx) * 2u;  // bytes per x^T row
      const char* xb = reinterpret_cast<const char*>(xt + n0 + ch * 8);
      unsigned short* bdst = bs + kr0 * L::BP + ch * 8;
      const unsigned char* cw = cs + sw * 32 + kr0;
      const int gb = g0 + (kr0 >> 2);
#pragma unroll
      for (int j = 0; j < KW * 32 / RPP; ++j) {
        const int s = (j * RPP) >> 5;
        const int rr = (j * RPP) & 31;  // compile-time part of the row
        const unsigned gcol = static_cast<unsigned>((gb + 8 * s + (rr >> 2)) * M) + cw[s * 32 + rr];
        cp_async_16(bdst + j * RPP * L::BP, xb + gcol * ldt2, 16);
      }
      constexpr int VCH = BM * KW * 2;  // 16-byte value chunks of the window
#pragma unroll
      for (int j = 0; j < (VCH + NT - 1) / NT; ++j) {
        const int i = tid + j * NT;
        if (VCH % NT == 0 || i < VCH) {
          const int row = i / (KW * 2);
          const int c = i % (KW * 2);
          cp_async_16(as + row * L::AP + c * 16, vals8 + ((long long)(m0 + row) * p.Gp + g0 + 4 * c) * 4, 16);
        }
      }
      constexpr int MCH = BM * KW;  // 8-byte metadata chunks of the window
#pragma unroll
      for (int j = 0; j < (MCH + NT - 1) / NT; ++j) {
        const int i = tid + j * NT;
        if (MCH % NT == 0 || i < MCH) {
          const int row = i / KW;
          const int c = i % KW;
          cp_async_8(ms + row * L::MP + c * 8, p.meta + (long long)(m0 + row) * p.Gp + g0 + 8 * c, 8);
        }
      }
      return;
    }
    // B gather: KW*32 k-rows x CPR chunks of 16 bytes (8 tokens)
    for (int i = tid; i < nvalid * 32 * CPR; i += NT) {
      const int kr = i / CPR;
      const int ch = i & (CPR - 1);
      const int s = kr >> 5;
      const int r = kr & 31;
      const int c = cs[(sw + s) * 32 + r];
      const int gcol = (g0 + 8 * s + (r >> 2)) * M + c;
      const int t = n0 + ch * 8;
      const bool ok = gcol < p.K && t < p.ldx;
      const unsigned short* src = ok ? xt + (long long)gcol * p.ldx + t : xt;
      cp_async_16(bs + kr * L::BP + ch * 8, src, ok ? 16 : 0);
    }
    // values: KW*2 chunks of 16 B (4 groups) per row
    for (int i = tid; i < BM * nvalid * 2; i += NT) {
      const int row = i / (nvalid * 2);
      const int c = i - row * (nvalid * 2);
      const unsigned char* src = vals8 + ((long long)(m0 + row) * p.Gp + g0 + 4 * c) * 4;
      cp_async_16(as + row * L::AP + c * 16, src, 16);
    }
    // metadata: KW chunks of 8 B (8 groups) per row
    for (int i = tid; i < BM * nvalid; i += NT) {
      const int row = i / nvalid;
      const int c = i - row * nvalid;
      const unsigned char* src = p.meta + (long long)(m0 + row) * p.Gp + g0 + 8 * c;
      cp_async_8(ms + row * L::MP + c * 8, src, 8);
    }
  };

  float acc[FM][FN][4];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[i][j][k] = 0.f;

  auto compute_step = [&](int st, int s2) {
    const unsigned char* base = stages + st * L::STAGE;
    const unsigned short* bs = reinterpret_cast<const unsigned short*>(base);
    const unsigned char* as = base + L::B_BYTES;
    const unsigned char* ms = as + BM * L::AP;
    unsigned a[FM][4];
    unsigned e[FM];
#pragma unroll
    for (int i = 0; i < FM; ++i) {
      // matrices: 0 = rows 0-7 / k 0-7, 1 = rows 8-15 / k 0-7, 2 = rows 0-7 / k 8-15, 3 = rows 8-15 / k 8-15
      const int arow = wm * WM + i * 16 + lr + (lq & 1) * 8;
      ldmatrix_x4(a[i], as + arow * L::AP + s2 * 32 + (lq >> 1) * 16);
      const int row = wm * WM + i * 16 + g;
      const unsigned m0w = *reinterpret_cast<const unsigned*>(ms + row * L::MP + s2 * 8 + 4 * pp);
      const unsigned m1w =
          *reinterpret_cast<const unsigned*>(ms + (row + 8) * L::MP + s2 * 8 + 4 * pp);
      e[i] = compact_nibbles(m0w) | (compact_nibbles(m1w) << 16);
    }
    // B fragment j: matrix q = k-rows 8q..8q+7 of this k-step, tokens wn*WN + 8j .. +7
    const unsigned short* bw = bs + (s2 * 32 + lq * 8 + lr) * L::BP + wn * WN;
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      unsigned b[4];
      ldmatrix_x4_trans(b, bw + j * 8);
#pragma unroll
      for (int i = 0; i < FM; ++i) mma_sp_16832<BF16>(acc[i][j], a[i], b, e[i]);
    }
  };

  run_pipeline<STAGES, KW>(nwin, nsteps, load_stage, compute_step);

  store_tile<BF16, WM, WN, WARPS_M, WARPS_N>(acc, p, m0, n0, wm, wn, smem_raw);
}

// =============================================================================================
// v4 decode path (<= 16 tokens): spatha_spmm_stream -- the weight streams from HBM straight into
// registers; nothing of it goes through shared memory.
//
// At decode the kernel is a weight stream: every byte of values/metadata is used by 1-16 tokens only,
// so the job is to keep enough 16-byte loads in flight on every SM. The canonical layout is read as is:
//
// * A "pair" is 16 column groups = 2 mma k-steps. Lane (g, tig) of a warp loads 16 bytes of values of
//   row g (groups 4tig..4tig+3 of the pair) and of row g+8: two LDG.128 per 16-row tile and pair, each
//   instruction 8 rows x 64 contiguous bytes. The mma's k-slots are assigned to groups so that these
//   registers ARE the A fragments: k-step s, slot j < 4 <-> group 4j + 2s, slot 4 + j <-> group 4j+1+2s
//   (a0 = row g slot tig, a2 = row g slot 4+tig; the order of k inside one mma is free, as long as B
//   gathers the same columns).
// * Metadata: lane tig supplies slots 4*(tig&1).. of k-step tig>>1 (sparsity selector 0 for k-step 0:
//   lanes 0,1; selector 1 for k-step 1: lanes 2,3), i.e. the nibbles of groups {4j + tig}. Each lane
//   loads 8 of the 16 metadata bytes of one of its rows (LDG.64) and 4 shuffles hand each lane its own.
// * B: the CTA stages its k-range of x (T <= 16 rows, all M columns of each group) in shared memory once
//   with cp.async, plus the column indices of each warp's V-block; lanes gather their 2 halves per
//   register with 2-byte shared loads. A warp owns RT 16-row tiles of one V-block, so each gathered B
//   fragment feeds RT mma.
// * Loads of the next UP pairs are issued before the current ones are used (register double buffer);
//   the first batch is in flight while x arrives.
// * Split-K in ONE launch: every CTA writes fp32 partials (fragment order, coalesced); the last CTA of
//   a row group to arrive (atomic counter) sums all partials in split order (deterministic), adds the
//   bias and writes y, and resets the counter.
//
// Grid: (ceil(Rp / (16*RT*WR)), nsplit). Host requirements: V % (16*RT) == 0, Gp % 8 == 0,
//   steps_per_split even, x rows 16-byte aligned with ldx % 8 == 0, values 16-byte aligned.
// Dynamic shared memory: 8*NT*(steps*8*M + 8)*2 + WR*steps*8*4 bytes (steps = steps_per_split).
// =============================================================================================
__device__ __forceinline__ uint4 ldg_stream_128(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 ldg_stream_64(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

// Registers of one (16-row tile, pair): values of rows g and g+8, and this lane's 8 metadata bytes.
struct StreamFrag {
  uint4 v0, v1;
  uint2 meta;
};

// One pair (2 k-steps) of one warp: RT 16-row tiles x NT 8-token tiles of mma.sp. f: the A registers of
// the pair (layout in the header above), cw: the column words of the warp's V-block (staged groups), xr:
// this lane's token row of each n-tile in the staged x chunk, u: the pair's index in the staged chunk.
// The metadata registers of a pair: lane tig needs the nibbles of bytes {4j + tig} of rows g, g+8 (see
// the header); each lane loaded 8 bytes of one row, 4 shuffles hand each lane its own.
template <int RT>
__device__ __forceinline__ void stream_pair_meta(const StreamFrag (&f)[RT], int lane, unsigned (&e)[RT]) {
  const int tig = lane & 3;
#pragma unroll
  for (int i = 0; i < RT; ++i) {
    const unsigned w = (f[i].meta.x & 0x0F0F0F0Fu) | ((f[i].meta.y & 0x0F0F0F0Fu) << 4);
    const unsigned s0 = __shfl_sync(0xffffffffu, w, (lane & ~3) | 0);
    const unsigned s1 = __shfl_sync(0xffffffffu, w, (lane & ~3) | 1);
    const unsigned s2 = __shfl_sync(0xffffffffu, w, (lane & ~3) | 2);
    const unsigned s3 = __shfl_sync(0xffffffffu, w, (lane & ~3) | 3);
    const unsigned sel = tig | ((tig + 4) << 4);
    e[i] = __byte_perm(__byte_perm(s0, s1, sel), __byte_perm(s2, s3, sel), 0x5410);
  }
}

// The gather + mma part of one pair, given the metadata registers e (one per 16-row tile) of the pair.
template <bool BF16, int NT, int RT>
__device__ __forceinline__ void stream_pair_mma_e(float (&acc)[RT][NT][4], const StreamFrag (&f)[RT],
                                                  const unsigned (&e)[RT], const unsigned* cw,
                                                  const unsigned short* const (&xr)[NT], int M, int u, int lane) {
  const int tig = lane & 3;
  const int h = tig >> 1;
  const int csh = 16 * (tig & 1);  // this lane's 2 of the 4 column bytes of a group
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    // groups of k-step s seen by this lane's B registers: slot 2q + h
    const int gl[4] = {16 * u + 4 * h + 2 * s, 16 * u + 8 + 4 * h + 2 * s, 16 * u + 4 * h + 1 + 2 * s,
                       16 * u + 9 + 4 * h + 2 * s};
    int o0[4], o1[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const unsigned c = cw[gl[q]] >> csh;
      o0[q] = gl[q] * M + (c & 0xFF);
      o1[q] = gl[q] * M + ((c >> 8) & 0xFF);
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      unsigned b[4];
#pragma unroll
      for (int q = 0; q < 4; ++q)
        b[q] = static_cast<unsigned>(xr[j][o0[q]]) | (static_cast<unsigned>(xr[j][o1[q]]) << 16);
#pragma unroll
      for (int i = 0; i < RT; ++i) {
        if (s == 0) {
          const unsigned a[4] = {f[i].v0.x, f[i].v1.x, f[i].v0.y, f[i].v1.y};
          mma_sp_16832<BF16, 0>(acc[i][j], a, b, e[i]);
        } else {
          const unsigned a[4] = {f[i].v0.z, f[i].v1.z, f[i].v0.w, f[i].v1.w};
          mma_sp_16832<BF16, 1>(acc[i][j], a, b, e[i]);
        }
      }
    }
  }
}

// One pair with the metadata from the canonical bytes in f[i].meta (v4 stream, v5 ring): lane tig needs the
// nibbles of bytes {4j + tig} of rows g, g+8 (see the header); each lane loaded 8 bytes of one row, 4
// shuffles hand each lane its own (format.decode_meta_layout is the same word, laid out once per weight for
// the v7 kernel).
template <bool BF16, int NT, int RT>
__device__ __forceinline__ void stream_pair_mma(float (&acc)[RT][NT][4], const StreamFrag (&f)[RT],
                                                const unsigned* cw, const unsigned short* const (&xr)[NT],
                                                int M, int u, int lane) {
  const int tig = lane & 3;
  unsigned e[RT];
#pragma unroll
  for (int i = 0; i < RT; ++i) {
    const unsigned w = (f[i].meta.x & 0x0F0F0F0Fu) | ((f[i].meta.y & 0x0F0F0F0Fu) << 4);
    const unsigned s0 = __shfl_sync(0xffffffffu, w, (lane & ~3) | 0);
    const unsigned s1 = __shfl_sync(0xffffffffu, w, (lane & ~3) | 1);
    const unsigned s2 = __shfl_sync(0xffffffffu, w, (lane & ~3) | 2);
    const unsigned s3 = __shfl_sync(0xffffffffu, w, (lane & ~3) | 3);
    const unsigned sel = tig | ((tig + 4) << 4);
    e[i] = __byte_perm(__byte_perm(s0, s1, sel), __byte_perm(s2, s3, sel), 0x5410);
  }
  stream_pair_mma_e<BF16, NT, RT>(acc, f, e, cw, xr, M, u, lane);
}

// Epilogue of the decode kernels (v4 stream, v5 ring). One split (p.nsplit == 1): + bias, write y. Else
// one-launch split-K: each warp slot (slot of slots per CTA) writes its fp32 partials in fragment order;
// the last CTA of the row group to arrive (atomic counter) sums all splits in fixed split order (so the
// result does not depend on who is last), adds the bias, writes y and resets the counter. Every thread of
// the CTA must call it (barriers); `partials` / `reduces` say which warps write / sum.
template <bool BF16, int NT, int RT>
__device__ __forceinline__ void stream_epilogue(const SpmmParams& p, float (&acc)[RT][NT][4], int wrow, int slot,
                                                int slots, bool partials, bool reduces, int& s_last) {
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int tig = lane & 3;
  const int split = blockIdx.y;
  const unsigned short* bias16 = reinterpret_cast<const unsigned short*>(p.bias);
  unsigned short* y16 = reinterpret_cast<unsigned short*>(p.y);
  auto write_out = [&]() {
#pragma unroll
    for (int i = 0; i < RT; ++i) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = wrow + i * 16 + g + 8 * hh;
        if (row >= p.R) continue;
        const float bv = p.bias ? to_float(bias16[row], BF16) : 0.f;
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int kk = 0; kk < 2; ++kk) {
            const int t = j * 8 + 2 * tig + kk;
            if (t < p.T) y16[(long long)t * p.ldy + row] = from_float<BF16>(acc[i][j][hh * 2 + kk] + bv);
          }
      }
    }
  };
  if (p.nsplit == 1) {
    if (reduces) write_out();
    return;
  }
  constexpr int FRAG = RT * NT * 4 * 32;  // floats per warp slot and split
  if (partials) {
    float* mine = p.ws + (((long long)blockIdx.x * p.nsplit + split) * slots + slot) * FRAG;
#pragma unroll
    for (int i = 0; i < RT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int k = 0; k < 4; ++k) mine[((i * NT + j) * 4 + k) * 32 + lane] = acc[i][j][k];
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(p.counters + blockIdx.x, 1) == p.nsplit - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  if (reduces) {
#pragma unroll
    for (int i = 0; i < RT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[i][j][k] = 0.f;
    for (int sp = 0; sp < p.nsplit; ++sp) {
      const float* src = p.ws + (((long long)blockIdx.x * p.nsplit + sp) * slots + slot) * FRAG;
#pragma unroll
      for (int i = 0; i < RT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int k = 0; k < 4; ++k) acc[i][j][k] += __ldcg(src + ((i * NT + j) * 4 + k) * 32 + lane);
    }
    write_out();
  }
  if (tid == 0) p.counters[blockIdx.x] = 0;
}

__device__ __forceinline__ void cp_async_16_mem(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_8_mem(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(bytes)
               : "memory");
}
// "memory" clobbers: the ring is read with plain shared loads and re-filled without a barrier, so the
// compiler must not move those loads across the waits and copies.
__device__ __forceinline__ void cp_async_commit_mem() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait_mem() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// The decode kernels' (v4 stream, v5 ring) staging of one split's operands with cp.async, not committed:
// the x chunk (rows token rows, cpr 16-byte chunks from column g_begin*M; zero past K, and past T when
// CHECK_T) into xs [rows][XP], and the column words of each of the row_warps row warps' V-block (groups
// g_begin .. g_end, the warp's first row m0 + w*rows_per_warp) into cs [row_warps][ngp]. MEM: the copies
// with a "memory" clobber (the ring kernel reads its buffers without barriers in between).
template <bool MEM, bool CHECK_T, int NTH>
__device__ __forceinline__ void stage_x_and_columns(const SpmmParams& p, unsigned short* xs, int XP, int rows,
                                                    int cpr, unsigned* cs, int row_warps, int rows_per_warp,
                                                    int m0, int ngp, int g_begin, int g_end) {
  const int tid = threadIdx.x;
  const unsigned short* x16 = reinterpret_cast<const unsigned short*>(p.x);
  const int col0 = g_begin * p.M;
  for (int i = tid; i < rows * cpr; i += NTH) {
    const int row = i / cpr;
    const int ch = i - row * cpr;
    const int col = col0 + ch * 8;
    const int valid = (!CHECK_T || row < p.T) ? p.K - col : 0;
    const int bytes = valid >= 8 ? 16 : (valid > 0 ? valid * 2 : 0);
    const unsigned short* src = bytes ? x16 + (long long)row * p.ldx + col : x16;
    if (MEM)
      cp_async_16_mem(xs + row * XP + ch * 8, src, bytes);
    else
      cp_async_16(xs + row * XP + ch * 8, src, bytes);
  }
  const int cpw = ngp >> 2;  // 16-byte chunks (4 groups) per warp
  for (int i = tid; i < row_warps * cpw; i += NTH) {
    const int w = i / cpw;
    const int c = i - w * cpw;
    const int row0 = min(m0 + w * rows_per_warp, p.Rp - 1);
    const int gg = g_begin + 4 * c;
    const bool ok = gg < g_end;
    const unsigned char* src = ok ? p.columns + ((long long)(row0 / p.V) * p.Gp + gg) * 4 : p.columns;
    if (MEM)
      cp_async_16_mem(cs + w * ngp + 4 * c, src, ok ? 16 : 0);
    else
      cp_async_16(cs + w * ngp + 4 * c, src, ok ? 16 : 0);
  }
}

template <bool BF16, int NT, int RT, int WR, int UP>
__global__ void __launch_bounds__(WR * 32)
    spatha_spmm_stream(const SpmmParams p) {
  constexpr int TP = 8 * NT;  // staged token rows
  constexpr int NTH = WR * 32;
  static_assert(NT >= 1 && NT <= 2 && RT >= 1 && UP >= 1, "stream config");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int s_last;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int tig = lane & 3;
  const int h = tig >> 1;
  const int pp = tig & 1;

  const int m0 = blockIdx.x * (16 * RT * WR);
  const int wrow = m0 + warp * 16 * RT;  // first row of this warp
  const bool warp_ok = wrow < p.Rp;
  const int split = blockIdx.y;
  const int s_begin = split * p.steps_per_split;
  const int s_end = min(p.Gp / 8, s_begin + p.steps_per_split);
  const int g_begin = 8 * s_begin;
  const int g_end = 8 * s_end;
  const int npairs = (g_end - g_begin + 15) >> 4;
  const int ngp = npairs * 16;  // staged groups (the last pair may be half beyond Gp)
  const int M = p.M;
  const int XW = ngp * M;       // staged x columns
  const int XP = XW + 8;        // pitch in halves (+16 B: token rows start on different banks)

  unsigned short* xs = reinterpret_cast<unsigned short*>(smem_raw);            // [TP][XP]
  unsigned* cs = reinterpret_cast<unsigned*>(smem_raw + TP * XP * 2);          // [WR][ngp] column words
  const unsigned char* vals8 = reinterpret_cast<const unsigned char*>(p.values);

  // ---- weight loads (registers) ------------------------------------------------------------------
  const long long vrow = (long long)(wrow + g) * p.Gp * 4;  // byte offset of row g's values
  const long long vstep = 16LL * p.Gp * 4;                  // next 16-row tile
  // metadata: lane loads row g (tig < 2) or g+8 (tig >= 2), bytes 8*(tig&1) .. +8 of the pair
  const long long mrow = (long long)(wrow + g + 8 * h) * p.Gp + g_begin + 8 * pp;
  auto load_pair = [&](StreamFrag (&f)[RT], int u) {
    const int gv = g_begin + 16 * u + 4 * tig;
    const bool vok = warp_ok && gv < g_end;
    const int gm = g_begin + 16 * u + 8 * pp;
    const bool mok = warp_ok && gm < g_end;
#pragma unroll
    for (int i = 0; i < RT; ++i) {
      const unsigned char* vp = vals8 + vrow + i * vstep + (long long)gv * 4;
      f[i].v0 = vok ? ldg_stream_128(vp) : make_uint4(0, 0, 0, 0);
      f[i].v1 = vok ? ldg_stream_128(vp + 8 * p.Gp * 4) : make_uint4(0, 0, 0, 0);
      f[i].meta = mok ? ldg_stream_64(p.meta + mrow + i * 16LL * p.Gp + 16 * u)
                      : make_uint2(0, 0);
    }
  };
  // Pairs of this CTA's split, handled by every warp for its own rows: batch b = pairs b*UP .. b*UP+UP-1.
  // Two register buffers used in turn (no copies, which would wait for the loads): while one batch is
  // consumed, the next one is in flight.
  const int nb = (npairs + UP - 1) / UP;
  StreamFrag fa[UP][RT], fb[UP][RT];
  auto load_batch = [&](StreamFrag (&f)[UP][RT], int b) {
#pragma unroll
    for (int k = 0; k < UP; ++k)
      if (b * UP + k < npairs) load_pair(f[k], b * UP + k);
  };
  load_batch(fa, 0);

  // ---- x chunk and column indices -> shared memory ---------------------------------------------
  {
    stage_x_and_columns<false, true, NTH>(p, xs, XP, TP, XW >> 3, cs, WR, 16 * RT, m0, ngp, g_begin, g_end);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
  }

  float acc[RT][NT][4];
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[i][j][k] = 0.f;

  const unsigned* cw = cs + warp * ngp;
  const unsigned short* xr[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) xr[j] = xs + (j * 8 + g) * XP;  // this lane's token row of n-tile j
  auto compute_pair = [&](const StreamFrag (&f)[RT], int u) { stream_pair_mma<BF16, NT, RT>(acc, f, cw, xr, M, u, lane); };

  auto compute_batch = [&](StreamFrag (&f)[UP][RT], int b) {
#pragma unroll
    for (int k = 0; k < UP; ++k)
      if (b * UP + k < npairs) compute_pair(f[k], b * UP + k);
  };
  for (int b = 0; b < nb; b += 2) {
    if (b + 1 < nb) load_batch(fb, b + 1);
    compute_batch(fa, b);
    if (b + 1 >= nb) break;
    if (b + 2 < nb) load_batch(fa, b + 2);
    compute_batch(fb, b + 1);
  }

  // ---- epilogue ------------------------------------------------------------------------------------
  stream_epilogue<BF16, NT, RT>(p, acc, wrow, warp, WR, true, warp_ok, s_last);
}

// The same pair for one 8-token tile, with B read from x pre-gathered per V-block (spatha_spmm_ring with
// SEL), in fragment order: words u*32 + s*16 + tig*4 + q of this lane's token row ARE its B registers
// b[0..3] of k-step s of pair u (the pre-gather in spatha_spmm_ring), so one k-step's B is ONE 16-byte
// shared load (v5.1: four 32-bit loads; the gather form: a column word + 2 two-byte loads per register).
template <bool BF16, int RT>
__device__ __forceinline__ void stream_pair_mma_sel(float (&acc)[RT][1][4], const StreamFrag (&f)[RT],
                                                    const unsigned* xsel_row, int u, int lane) {
  const int tig = lane & 3;
  unsigned e[RT];
  stream_pair_meta<RT>(f, lane, e);
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const uint4 bv = *reinterpret_cast<const uint4*>(xsel_row + u * 32 + s * 16 + tig * 4);
    const unsigned b[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
    for (int i = 0; i < RT; ++i) {
      if (s == 0) {
        const unsigned a[4] = {f[i].v0.x, f[i].v1.x, f[i].v0.y, f[i].v1.y};
        mma_sp_16832<BF16, 0>(acc[i][0], a, b, e[i]);
      } else {
        const unsigned a[4] = {f[i].v0.z, f[i].v1.z, f[i].v0.w, f[i].v1.w};
        mma_sp_16832<BF16, 1>(acc[i][0], a, b, e[i]);
      }
    }
  }
}

// =============================================================================================
// v5 decode path (<= 16 tokens): spatha_spmm_ring -- the weight streams through a per-warp cp.async
// ring in shared memory; the CTA's K range is split among its warps and reduced in shared memory.
//
// Why (docs/perf-notes.md, v5): v4 held the next batch of weight loads in registers, so a warp had one
// batch (<= 5 KB) in flight and each batch cost a memory round trip; its global split-K (partials +
// fence + counter + a second read) added another ~3 round trips. Timings fit ~5 us fixed + bytes at
// ~3 TB/s: the fixed part, not the bandwidth, lost to cuBLAS on 4096-wide layers. Here:
// * Warp (rw, ks) of a CTA owns 16*RT rows (row warp rw) and the pairs ks, ks + KS, ks + 2 KS, ... of the
//   CTA's k-range, so the KS warps of a row warp read adjacent 64-byte pieces of the same rows at once.
// * Each lane copies exactly the A-fragment bytes it will use (the v4 register layout: 2 x 16 B of values
//   and 8 B of metadata per 16-row tile and pair) into its own slot of an S-stage ring with cp.async, so
//   S-1 pairs per warp are in flight from the start, no register is spent on them, and no barrier is
//   needed (a lane only reads what it copied itself).
// * The KS partial sums of a row warp meet in shared memory (fixed order). Global split-K (the v4
//   one-launch scheme) is only used where the rows alone give too few CTAs, or the x chunk is too big.
// * x is staged for the T real tokens only (lanes of token rows >= T read row T-1: mma columns are
//   independent and those outputs are never written), so 1-token calls stage 1/8 of v4's chunk.
// The mma part is stream_pair_mma, shared with v4.
//
// Grid: (ceil(Rp / (16*RT*RW)), nsplit); block RW*KS warps. Host requirements as v4.
// Dynamic shared memory (bytes): RW*KS*S*RT*1280 (ring) + TS*(steps*8*M + 8)*2 (x, TS = min(T, 8*NT))
//   + RW*steps*8*4 (column words) + (KS-1)*RW*RT*NT*512 (partials) [+ SEL: RW*TS*(steps*16 + 16)*4, the
//   pre-gathered x], steps = steps_per_split rounded to even.
// SEL (v5.1/v5.2, NT = 1): after staging, the CTA gathers the selected columns of x once per row warp, in
// the order of the B registers, so one k-step's B is one 16-byte shared load instead of 4 column-word reads
// + 8 two-byte loads per k-step: per pair (one 16-row tile) 9 shared-memory/shuffle instructions (3 ring
// loads, 4 metadata shuffles, 2 B loads) instead of 15 with v5.1's 32-bit B loads and 31 in the gather
// form; the v5 profile (ncu) says these (MIO) are the limiter.
// =============================================================================================
template <bool BF16, int NT, int RT, int RW, int KS, int S, bool SEL = false>
__global__ void __launch_bounds__(RW * KS * 32)
    spatha_spmm_ring(const SpmmParams p) {
  constexpr int NTH = RW * KS * 32;
  constexpr int TB = 1280;  // ring bytes per (stage, 16-row tile): v0 [32][16 B], v1 [32][16 B], meta [32][8 B]
  constexpr int FR = RT * NT * 4;
  static_assert(NT >= 1 && NT <= 2 && RT >= 1 && RW >= 1 && KS >= 1 && S >= 3, "ring config");
  static_assert(!SEL || NT == 1, "the pre-gathered x (SEL) is built for one 8-token tile");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int s_last;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int rw = warp % RW;
  const int ks = warp / RW;
  const int g = lane >> 2;
  const int tig = lane & 3;
  const int h = tig >> 1;
  const int pp = tig & 1;

  const int m0 = blockIdx.x * (16 * RT * RW);
  const int wrow = m0 + rw * 16 * RT;
  const bool warp_ok = wrow < p.Rp;
  const int split = blockIdx.y;
  const int s_begin = split * p.steps_per_split;
  const int s_end = min(p.Gp / 8, s_begin + p.steps_per_split);
  const int g_begin = 8 * s_begin;
  const int g_end = 8 * s_end;
  const int npairs = (g_end - g_begin + 15) >> 4;
  const int ngp = npairs * 16;
  const int M = p.M;
  const int XW = ngp * M;
  const int XP = XW + 8;
  const int TS = min(p.T, 8 * NT);

  unsigned char* ring = smem_raw;                                                    // [warps][S][RT][TB]
  unsigned short* xs = reinterpret_cast<unsigned short*>(smem_raw + NTH / 32 * S * RT * TB);  // [TS][XP]
  unsigned* cs = reinterpret_cast<unsigned*>(reinterpret_cast<unsigned char*>(xs) + TS * XP * 2);  // [RW][ngp]
  float* red = reinterpret_cast<float*>(cs + RW * ngp);                             // [KS-1][RW][FR][32]
  // SEL: x pre-gathered per row warp's V-block, [RW][TS][ngp*2 + 16] words after the partials (16-byte
  // aligned: every region before it is a multiple of 16 bytes; +16 words per row: ngp*2 is a multiple of
  // 32 words, so consecutive token rows start half a bank cycle apart and the two token rows of each
  // 8-lane phase of a 16-byte load never share a bank)
  auto xsel_row = [&](int wt) {
    return reinterpret_cast<unsigned*>(red + (KS - 1) * RW * FR * 32) + wt * (ngp * 2 + 16);
  };
  const unsigned char* vals8 = reinterpret_cast<const unsigned char*>(p.values);

  // ---- x chunk (TS token rows) and the row warps' column words: cp.async group 0 ----------------------
  {
    // TS <= T rows: no token check needed
    stage_x_and_columns<true, false, NTH>(p, xs, XP, TS, XW >> 3, cs, RW, 16 * RT, m0, ngp, g_begin, g_end);
    cp_async_commit_mem();
  }

  // ---- weight ring: this lane's bytes of pair u -> stage st -----------------------------------------
  const long long vrow = (long long)(wrow + g) * p.Gp * 4;
  const long long vstep = 16LL * p.Gp * 4;
  const long long mrow = (long long)(wrow + g + 8 * h) * p.Gp + g_begin + 8 * pp;
  unsigned char* my_ring = ring + warp * S * RT * TB;
  auto issue_pair = [&](int u, int st) {
    const int gv = g_begin + 16 * u + 4 * tig;
    const bool vok = warp_ok && gv < g_end;
    const bool mok = warp_ok && g_begin + 16 * u + 8 * pp < g_end;
#pragma unroll
    for (int i = 0; i < RT; ++i) {
      unsigned char* d = my_ring + (st * RT + i) * TB;
      const unsigned char* vp = vals8 + vrow + i * vstep + (long long)gv * 4;
      cp_async_16_mem(d + lane * 16, vok ? vp : vals8, vok ? 16 : 0);
      cp_async_16_mem(d + 512 + lane * 16, vok ? vp + 8LL * p.Gp * 4 : vals8, vok ? 16 : 0);
      cp_async_8_mem(d + 1024 + lane * 8, mok ? p.meta + mrow + i * 16LL * p.Gp + 16 * u : p.meta, mok ? 8 : 0);
    }
  };
  const int np_w = ks < npairs ? (npairs - ks + KS - 1) / KS : 0;  // pairs of this warp
#pragma unroll
  for (int j = 0; j < S - 1; ++j) {
    if (j < np_w) issue_pair(ks + KS * j, j);
    cp_async_commit_mem();
  }
  cp_async_wait_mem<S - 1>();  // group 0 (x, column words) has landed for this thread ...
  __syncthreads();             // ... and for every thread
  if (SEL) {
    // once per CTA: the 4 selected columns of every staged group, per row warp and token, packed in pairs
    // (the 2 halves of one B register) and stored where the lane that uses them reads its k-step's B:
    // group gi = 16u + r of pair u feeds, with the half-pair q2, register q = (r >> 3) + 2 (r & 1) of
    // k-step s = (r >> 1) & 1 of the lanes tig = 2 ((r >> 2) & 1) + q2 (the slot order of stream_pair_mma)
    const int per_row = ngp * 2;
    for (int i = tid; i < RW * TS * per_row; i += NTH) {
      const int wt = i / per_row;  // row warp * TS + token
      const int k = i - wt * per_row;
      const int gi = k >> 1;
      const int q2 = k & 1;
      const int w = wt / TS;
      const int t = wt - w * TS;
      const unsigned c = cs[w * ngp + gi] >> (16 * q2);
      const unsigned short* xrow = xs + t * XP + gi * M;
      const int r = gi & 15;
      const int dst = (gi >> 4) * 32 + ((r >> 1) & 1) * 16 + (2 * ((r >> 2) & 1) + q2) * 4 + (r >> 3) + 2 * (r & 1);
      xsel_row(wt)[dst] = static_cast<unsigned>(xrow[c & 0xFF]) | (static_cast<unsigned>(xrow[(c >> 8) & 0xFF]) << 16);
    }
    __syncthreads();
  }

  float acc[RT][NT][4];
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[i][j][k] = 0.f;

  const unsigned* cw = cs + rw * ngp;
  const unsigned short* xr[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) xr[j] = xs + min(j * 8 + g, TS - 1) * XP;
  for (int j = 0; j < np_w; ++j) {
    cp_async_wait_mem<S - 2>();  // pair j has landed (this lane's own bytes)
    const int nx = j + S - 1;    // refill the stage read in the previous iteration
    if (nx < np_w) issue_pair(ks + KS * nx, nx % S);
    cp_async_commit_mem();
    const unsigned char* d = my_ring + (j % S) * RT * TB;
    StreamFrag f[RT];
#pragma unroll
    for (int i = 0; i < RT; ++i) {
      f[i].v0 = *reinterpret_cast<const uint4*>(d + i * TB + lane * 16);
      f[i].v1 = *reinterpret_cast<const uint4*>(d + i * TB + 512 + lane * 16);
      f[i].meta = *reinterpret_cast<const uint2*>(d + i * TB + 1024 + lane * 8);
    }
    if constexpr (SEL) {
      stream_pair_mma_sel<BF16, RT>(acc, f, xsel_row(rw * TS + min(g, TS - 1)), ks + KS * j, lane);
    } else {
      stream_pair_mma<BF16, NT, RT>(acc, f, cw, xr, M, ks + KS * j, lane);
    }
  }
  cp_async_wait_mem<0>();

  // ---- the KS partial sums of each row warp meet in shared memory (fixed order) ---------------------
  if (KS > 1) {
    if (ks > 0) {
      float* dst = red + ((ks - 1) * RW + rw) * FR * 32;
#pragma unroll
      for (int i = 0; i < RT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int k = 0; k < 4; ++k) dst[((i * NT + j) * 4 + k) * 32 + lane] = acc[i][j][k];
    }
    __syncthreads();
    if (ks == 0) {
      for (int kk = 1; kk < KS; ++kk) {
        const float* src = red + ((kk - 1) * RW + rw) * FR * 32;
#pragma unroll
        for (int i = 0; i < RT; ++i)
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int k = 0; k < 4; ++k) acc[i][j][k] += src[((i * NT + j) * 4 + k) * 32 + lane];
      }
    }
  }
  const bool writer = ks == 0 && warp_ok;

  // ---- epilogue: as v4 (global split-K partials + last-arriving CTA), the k-split warp 0 of each row warp
  stream_epilogue<BF16, NT, RT>(p, acc, wrow, rw, RW, writer, writer, s_last);
}

// =============================================================================================
// v7 decode path (<= 16 tokens, sm_90+): spatha_spmm_tma -- the weight streams through a CTA-wide ring
// of shared-memory stages filled by the Tensor Memory Accelerator (TMA), one producer warp, mbarriers.
//
// Why (docs/perf-notes.md, v5.2 / v7): the v4/v5 decode kernels stream the weight at ~1.5-2.5 TB/s of the
// H200's 4.8: every lane issues its own 16-byte copies (v5: cp.async into a per-warp ring, v4: loads into
// registers), so the bytes in flight per SM are bounded by warps x registers / ring slots, and the copies
// themselves share the MIO queue with the x gathers. Here one thread per CTA asks the copy engine for
// whole tiles: per stage and pair of k-steps one 2-D box of values (BR rows x 64 bytes) from the canonical
// packed layout as it is (tensor map over values (Rp, Gp*2) halves), and per stage one box of metadata
// (BR/16 tiles x PP pairs x 128 bytes) from the metadata in register order (format.decode_meta_layout,
// built once per weight on its device: tensor map over (Rp/16, Gp/16*32) words). S stages of BR*PP*72
// bytes are in flight per CTA from the start, and no consumer instruction is spent on copies.
// Why the metadata layout (docs/perf-notes.md, v7.1): the canonical byte per row and group carries one
// nibble, and turning 8 of those bytes per lane into the mma.sp sparsity register costs 4 shuffles and 3 byte
// permutes per 16-row tile and pair; the register-order words are half the bytes (the weight stream is 10 %
// shorter) and one conflict-free 32-bit shared load per tile and pair.
// * CTA = WR consumer warps (16*RT rows each, BR = 16*RT*WR rows) + 1 producer warp (lane 0 issues).
// * Stage st holds pairs PP*st .. PP*st+PP-1 of the CTA's split: values [PP][BR][64 B] (16 groups x
//   2 halves per row and pair: the rows of a pair are 64 bytes apart, so the 8 lanes of a 16-byte
//   shared-load phase read 2 rows x 64 B = 128 contiguous bytes, no bank conflict), meta [BR/16][PP][32]
//   words (word = lane).
// * A consumer lane reads the v4 register layout of the values (StreamFrag) and its metadata word per tile
//   from the stage, releases the stage (mbarrier arrive, all lanes), then runs stream_pair_mma_e (the x
//   gather and mma part shared with v4/v5).
// * x (T <= 8*NT token rows of the split's K range) and the column words are staged once per CTA with
//   cp.async, as in v5; TMA boxes beyond the tensor (rows >= Rp, groups >= Gp) arrive zero-filled.
// * Split-K: the one-launch scheme of v4 (partials + last-arriving CTA; stream_epilogue).
// Grid: (ceil(Rp / BR), nsplit); block (WR + 1) warps. Host requirements: as v4, plus Gp % 16 == 0 (the
// metadata rows are the tensor map's row stride, which TMA wants 16-byte aligned), steps_per_split a
// multiple of 2*PP (whole stages per split), and the tensor maps of TmaParams made for these tensors.
// Dynamic shared memory (bytes): S*BR*PP*72 (ring) + TS*(steps*8*M + 8)*2 (x, TS = min(T, 8*NT))
//   + WR*steps*8*4 (column words), steps = steps_per_split.
// Below sm_90 the kernel is compiled empty (no TMA there) and never dispatched.
// =============================================================================================
struct alignas(64) TmaDesc {
  unsigned long long words[16];  // a CUtensorMap, encoded by the driver (cuTensorMapEncodeTiled)
};
struct TmaParams {
  TmaDesc values;  // UINT16, dims {Gp*2, Rp}, box {32, BR}
  TmaDesc meta;    // UINT32 (format.decode_meta_layout), dims {Gp/16*32, Rp/16}, box {32*PP, BR/16}
  SpmmParams p;
};
// the host mirror (venom_hf.kernels.ops._TmaParams) assumes these offsets
static_assert(sizeof(TmaDesc) == 128 && alignof(TmaParams) == 64 &&
                  sizeof(TmaParams) == 256 + (sizeof(SpmmParams) + 63) / 64 * 64,
              "TmaParams layout");

__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(unsigned long long* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
  unsigned done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
  } while (!done);
}
// 2-D TMA tile load global -> shared, completion counted in bytes on `bar`. c0: innermost coordinate
// (elements), c1: row.
__device__ __forceinline__ void tma_load_2d(void* dst, const TmaDesc* map, int c0, int c1,
                                            unsigned long long* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
      "[%4];\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(smem_u32(bar))
      : "memory");
}

template <bool BF16, int NT, int RT, int WR, int PP, int S>
__global__ void __launch_bounds__((WR + 1) * 32)
    spatha_spmm_tma(const __grid_constant__ TmaParams tp) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int NTH = (WR + 1) * 32;
  constexpr int BR = 16 * RT * WR;
  constexpr int VB = BR * 64;               // bytes of one pair's values box
  constexpr int MB = BR / 16 * PP * 128;    // bytes of the stage's metadata box
  constexpr int STAGE = PP * VB + MB;       // BR * PP * 72: a multiple of 128 bytes
  static_assert(NT >= 1 && NT <= 2 && RT >= 1 && WR >= 1 && PP >= 1 && S >= 2, "tma config");
  static_assert(BR <= 256 && 32 * PP <= 256, "TMA boxes are at most 256 per dimension");
  const SpmmParams& p = tp.p;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ __align__(8) unsigned long long full[S];
  __shared__ __align__(8) unsigned long long empty[S];
  __shared__ int s_last;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const bool producer = warp == WR;
  const int g = lane >> 2;
  const int tig = lane & 3;

  const int m0 = blockIdx.x * BR;
  const int wrow = m0 + warp * 16 * RT;  // consumer warps: first row
  const bool warp_ok = !producer && wrow < p.Rp;
  const int split = blockIdx.y;
  const int s_begin = split * p.steps_per_split;
  const int s_end = min(p.Gp / 8, s_begin + p.steps_per_split);
  const int g_begin = 8 * s_begin;
  const int g_end = 8 * s_end;
  const int npairs = (g_end - g_begin + 15) >> 4;
  const int nst = (npairs + PP - 1) / PP;
  const int ngp = npairs * 16;
  const int M = p.M;
  const int XW = ngp * M;
  const int XP = XW + 8;
  const int TS = min(p.T, 8 * NT);

  unsigned char* ring = smem_raw;                                                         // [S][STAGE]
  unsigned short* xs = reinterpret_cast<unsigned short*>(smem_raw + S * STAGE);           // [TS][XP]
  unsigned* cs = reinterpret_cast<unsigned*>(reinterpret_cast<unsigned char*>(xs) + TS * XP * 2);  // [WR][ngp]

  auto issue_stage = [&](int st) {
    unsigned char* base = ring + (st % S) * STAGE;
    const int nv = min(PP, npairs - st * PP);
    mbar_expect_tx(&full[st % S], nv * VB + MB);
    for (int j = 0; j < nv; ++j)
      tma_load_2d(base + j * VB, &tp.values, 2 * (g_begin + 16 * (st * PP + j)), m0, &full[st % S]);
    tma_load_2d(base + PP * VB, &tp.meta, 2 * (g_begin + 16 * PP * st), m0 / 16, &full[st % S]);
  };
  // The producer lane initializes the barriers and starts the first S stages at once; the consumers first
  // wait on a barrier after the x staging's __syncthreads below, which also publishes the initialization.
  if (producer && lane == 0) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<unsigned long long>(&tp.values)) : "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<unsigned long long>(&tp.meta)) : "memory");
#pragma unroll
    for (int i = 0; i < S; ++i) {
      mbar_init(&full[i], 1);
      mbar_init(&empty[i], WR * 32);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    for (int st = 0; st < min(S, nst); ++st) issue_stage(st);
  }

  // ---- x chunk (TS token rows) and the consumer warps' column words (cp.async, every thread) ---------
  stage_x_and_columns<true, false, NTH>(p, xs, XP, TS, XW >> 3, cs, WR, 16 * RT, m0, ngp, g_begin, g_end);
  cp_async_commit_mem();
  cp_async_wait_mem<0>();
  __syncthreads();

  float acc[RT][NT][4];
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[i][j][k] = 0.f;

  if (producer) {
    if (lane == 0) {
      for (int st = S; st < nst; ++st) {
        mbar_wait(&empty[st % S], ((st / S) - 1) & 1);  // every consumer lane has read stage st - S
        issue_stage(st);
      }
    }
  } else {
    const unsigned* cw = cs + warp * ngp;
    const unsigned short* xr[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) xr[j] = xs + min(j * 8 + g, TS - 1) * XP;
    const int lrow = warp * 16 * RT + g;  // this lane's row g in the stage's boxes
    for (int st = 0; st < nst; ++st) {
      mbar_wait(&full[st % S], (st / S) & 1);
      const unsigned char* base = ring + (st % S) * STAGE;
      StreamFrag f[PP][RT];
      unsigned e[PP][RT];
      const unsigned* mw = reinterpret_cast<const unsigned*>(base + PP * VB);
#pragma unroll
      for (int u = 0; u < PP; ++u)
#pragma unroll
        for (int i = 0; i < RT; ++i) {
          const unsigned char* vb = base + u * VB + (lrow + 16 * i) * 64 + tig * 16;
          f[u][i].v0 = *reinterpret_cast<const uint4*>(vb);
          f[u][i].v1 = *reinterpret_cast<const uint4*>(vb + 8 * 64);
          e[u][i] = mw[((warp * RT + i) * PP + u) * 32 + lane];
        }
      mbar_arrive(&empty[st % S]);  // the stage's bytes are in registers: the producer may refill it
#pragma unroll
      for (int u = 0; u < PP; ++u)
        if (st * PP + u < npairs) stream_pair_mma_e<BF16, NT, RT>(acc, f[u], e[u], cw, xr, M, st * PP + u, lane);
    }
  }

  // ---- epilogue: as v4 (global split-K partials + last-arriving CTA); the producer warp only joins the
  // barriers
  stream_epilogue<BF16, NT, RT>(p, acc, wrow, producer ? 0 : warp, WR, !producer, warp_ok, s_last);
#endif
}

// Sum the split-K partials, add the bias, convert. One thread per output element.
template <bool BF16>
__global__ void __launch_bounds__(256) spatha_splitk_reduce(const ReduceParams p) {
  const long long n = (long long)p.T * p.R;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const unsigned short* bias16 = reinterpret_cast<const unsigned short*>(p.bias);
  unsigned short* y16 = reinterpret_cast<unsigned short*>(p.y);
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += stride) {
    const int t = static_cast<int>(idx / p.R);
    const int r = static_cast<int>(idx - (long long)t * p.R);
    float s = p.bias ? to_float(bias16[r], BF16) : 0.f;
    for (int k = 0; k < p.nsplit; ++k) s += p.ws[(long long)k * n + idx];
    y16[(long long)t * p.ldy + r] = from_float<BF16>(s);
  }
}


// D(64 x N, fp32) += A(64 x 32, 2:4 sparse, registers) * B(32 x N, shared memory, K-major, 128-byte
// swizzle) for the warpgroup: one wgmma.mma_async.sp (sparsity selector 0: lanes 0, 1 of each quad hold
// the metadata), asynchronous until wgmma_wait. Hopper sm_90a only.
template <bool BF16, int N>
__device__ __forceinline__ void wgmma_sp_rs(float* d, const unsigned (&a)[4], unsigned long long desc, unsigned e) {
  static_assert(N == 128, "wgmma N: the shipped tile");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// one asm statement for both 16-bit types (TY: the PTX type name)
#define VENOM_WGMMA_SP_M64N128K32(TY) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n" \
    "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32." TY "." TY " " \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
    "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, " \
    "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, " \
    "%59, %60, %61, %62, %63}, " \
    "{%64, %65, %66, %67}, %68, %69, 0, p, 1, 1, 0;\n}\n" \
    : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), \
    "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), \
    "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), \
    "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), \
    "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), \
    "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), \
    "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), \
    "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
    : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(e) \
    : "memory")
  if (BF16)
    VENOM_WGMMA_SP_M64N128K32("bf16");
  else
    VENOM_WGMMA_SP_M64N128K32("f16");
#undef VENOM_WGMMA_SP_M64N128K32
#endif
}

// =============================================================================================
// v8 prefill (sm_90a): spatha_spmm_wg -- sparse wgmma over the weight read as plain 2:4.
//
// A V:2:M row keeps 2 values per group of M columns, so every 4-column chunk of K holds at most 2 of them:
// the V:2:M weight IS a 2:4 weight over the full K (with extra zeros). This kernel runs it that way: B is
// x itself (K-major, the rows of x as they are; no x^T copy and no column gather, so one x tile in shared
// memory feeds every row of the CTA, as in a dense GEMM), A is the 2:4 form of the weight built in
// registers from the canonical values. Tensor work is that of 2:4 (half of dense) for every M; what M buys
// here is fewer weight bytes, not fewer MMAs.
//
// The per-chunk facts the 2:4 form needs (the two in-chunk positions of its slots, the metadata, and which
// of the row's two values -- or zero -- fills each slot) do not depend on x: they are computed once per
// device from columns/meta (venom_hf.format.wgmma_layout, the same bytes on the host and on the GPU) into
// a "chunk layout" of 512 bytes per 64-row tile and 32-column k-step, in the order the threads read it:
//   bytes   0..255: 64 metadata words, word w*16 + g*2 + h = the wgmma metadata register of the lanes
//                   (warp w, lane group g, h = tig & 1): chunks 4h..4h+3 of row 16w+g (bits 0-15, one
//                   nibble idx0 | idx1 << 2 per chunk) and of row 16w+g+8 (bits 16-31);
//   bytes 256..511: 128 code half-words, one per lane (w, g, tig): the slot sources of chunks tig and tig+4
//                   of row 16w+g (nibbles 0, 1) and of row 16w+g+8 (nibbles 2, 3); a nibble is
//                   s0 | s1 << 2 with s = 0: the group's first kept value, 1: its second, 2: zero.
// A register = one chunk = one 32-bit word of values (the group's 2 kept values) permuted by PRMT.
//
// CTA: 4 consumer warpgroups (64 rows each, BM = 256) x BN tokens, plus a producer warpgroup (its
// registers go to the consumers: setmaxnreg 24 / 112) whose first lane issues, per stage of 128 columns:
// two 64-column TMA boxes of x (128-byte swizzle: the wgmma B layout), one TMA box of values (256 rows x
// 128/M words, swizzled by its row width so that the consumers' 4-byte loads are conflict-free) and 4 bulk
// copies of the chunk layout; completion by mbarrier transaction count, S stages in flight. Each consumer
// warpgroup works in half-stages of 2 k-steps: build their A registers and metadata, issue 2 wgmma
// m64nBNk32 (A from registers, B by descriptor), commit them as one group, then wait until only that group
// is in flight (two register sets, so the next half is built while one group runs); a stage is released
// once its second half has completed. Epilogue: bias, conversion, staged through shared memory into
// 16-byte row stores; split-K: fp32 partials, reduced by spatha_splitk_reduce.
//
// Grid: (ceil(Rp / 256), ceil(T / BN), nsplit). Block 640 threads (4 consumer warpgroups, 1 producer).
// Host requirements: the tensor maps of WgParams made for these tensors (x: 16-byte aligned rows,
// ldx % 8 == 0), M a power of two in 4..32, the chunk layout for roundup(Rp, 256) rows and
// roundup(k-steps, 4) k-steps, stages_per_split whole stages.
// Dynamic shared memory: S * (BN*256 + 256*512/M + 8192) + 1024 bytes (the regions are 1024-byte aligned).
// Below sm_90a the kernel is compiled empty and never dispatched.
// =============================================================================================
struct WgParams {
  TmaDesc x_map;       // x (T, ldx): dims {K, T}, box {64, BN}, 128-byte swizzle
  TmaDesc values_map;  // values as 32-bit words (Rp, Gp): dims {Gp, Rp}, box {128/M, 256}, swizzle 512/M bytes
  const unsigned char* layout;  // chunk layout: [roundup(Rp,256)/64 tiles][nks_pad k-steps][512 bytes]
  const void* bias;             // (R,) or nullptr
  void* y;                      // (T, ldy)
  float* ws;                    // (nsplit, T, R) when nsplit > 1
  long long ldy;
  int T, R, Rp;
  int nks_pad;                  // k-steps of 32 columns in the layout (a multiple of 4)
  int stages_per_split;         // 128-column stages per split
  int nsplit;
  int log2m;
};
static_assert(sizeof(WgParams) == 384, "WgParams layout (the host mirror is ops._WgParams)");

__device__ __forceinline__ void bulk_load(void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_u32(dst)),
               "l"(src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ unsigned prmt(unsigned a, unsigned b, unsigned sel) {
  unsigned r;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}
// The PRMT selectors of 2 A registers from the source codes of their chunks: `w` holds one byte s0 | s1 << 4
// per chunk (s = 0: the group's first kept value, 1: its second, 2: zero); 0x543210 holds the byte pairs of
// the three sources (bytes 4, 5 of a PRMT with a zero second operand are zero). Bytes 0, 1 of the result
// select chunk 0's register, bytes 2, 3 chunk 1's.
__device__ __forceinline__ unsigned slot_selectors(unsigned w) { return prmt(0x00543210u, 0u, w); }
// The 4 source nibbles of a lane's k-step (s0 | s1 << 2 each) spread to one byte s0 | s1 << 4 each.
__device__ __forceinline__ unsigned spread_codes(unsigned code) {
  unsigned y = (code | (code << 8)) & 0x00FF00FFu;  // nibble pairs to bytes 0 and 2
  y = (y | (y << 4)) & 0x0F0F0F0Fu;                 // one nibble per byte
  return (y & 0x03030303u) | ((y & 0x0C0C0C0Cu) << 2);
}
__device__ __forceinline__ unsigned lds_u32(unsigned addr) {
  unsigned v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ unsigned lds_u16(unsigned addr) {
  unsigned short v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(addr));
  return v;
}
// A K-major, 128-byte-swizzled B tile (rows of 128 bytes, 8-row atoms of 1024 bytes) as a wgmma descriptor.
__device__ __forceinline__ unsigned long long kmajor_sw128_desc(const void* p) {
  const unsigned long long addr = smem_u32(p);
  return ((addr & 0x3FFFFull) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}

// The body of spatha_spmm_wg for one M (compile-time, so that every shared-memory address of the stage loop
// is a per-thread register plus a constant: the loop over the S stage slots is unrolled).
template <bool BF16, int BN, int S, int LOG2M>
__device__ __forceinline__ void wg_main(const WgParams& p, unsigned char* stages, unsigned long long* full,
                                        unsigned long long* empty) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BM = 256;
  constexpr int B_BYTES = BN * 256;     // two boxes of BN rows x 128 bytes
  constexpr int L_BYTES = 4 * 4 * 512;  // chunk layout: 4 tiles x 4 k-steps
  constexpr int VROW = 512 >> LOG2M;    // bytes of values per row and stage (128/M words)
  constexpr int V_BYTES = BM * VROW;
  constexpr int STAGE = B_BYTES + V_BYTES + L_BYTES;  // multiple of 1024
  constexpr unsigned VMASK = VROW / 16 - 1;           // the values box swizzle: 16-byte chunks per row - 1
  static_assert(BN == 128, "BN: the wgmma N of wgmma_sp_rs");

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int m0 = blockIdx.x * BM;
  const int n0 = blockIdx.y * BN;
  const int nst_all = p.nks_pad >> 2;
  const int st0 = blockIdx.z * p.stages_per_split;
  const int nst = min(nst_all, st0 + p.stages_per_split) - st0;

  if (warp >= 16) {
    // the producer warpgroup needs few registers: hand them to the consumers (setmaxnreg, per warpgroup)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
    if (warp == 16 && lane == 0) {
      const unsigned char* lay = p.layout + ((long long)(m0 >> 6) * p.nks_pad) * 512;
      for (int i = 0; i < nst; ++i) {
        const int slot = i % S;
        if (i >= S) mbar_wait(&empty[slot], ((i / S) - 1) & 1);
        unsigned char* base = stages + slot * STAGE;
        const int st = st0 + i;
        mbar_expect_tx(&full[slot], STAGE);
        tma_load_2d(base, &p.x_map, st * 128, n0, &full[slot]);
        tma_load_2d(base + BN * 128, &p.x_map, st * 128 + 64, n0, &full[slot]);
        tma_load_2d(base + B_BYTES, &p.values_map, st * (128 >> LOG2M), m0, &full[slot]);
#pragma unroll
        for (int t = 0; t < 4; ++t)
          bulk_load(base + B_BYTES + V_BYTES + t * 2048, lay + ((long long)t * p.nks_pad + 4 * st) * 512, 2048,
                    &full[slot]);
      }
    }
    return;
  }

  // ---- consumers: warpgroup wg owns rows m0 + 64*wg .. +63 -------------------------------------------
  // the CTA's registers at launch (640 x 96) minus the producer's (128 x 24) leave 112 per consumer thread
  asm volatile("setmaxnreg.inc.sync.aligned.u32 112;\n" ::: "memory");
  const int wg = warp >> 2;
  const int wl = warp & 3;
  const int g = lane >> 2;
  const int tig = lane & 3;
  const int row0 = wg * 64 + wl * 16 + g;  // this lane's rows in the stage: row0 and row0 + 8
  const unsigned s0 = smem_u32(stages);
  // The value word of chunk 8k + tig + 4j (k-step k of the stage) of row0 in stage slot 0, swizzled as the
  // TMA box stores it (16-byte chunk index ^ (row offset >> 7) & VMASK); row0 + 8 is 8 * VROW bytes on, with
  // the same swizzle (8 * VROW is a multiple of 128 * (VMASK + 1)).
  unsigned vaddr[4][2];
#pragma unroll
  for (int k = 0; k < 4; ++k)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const unsigned off = row0 * VROW + ((((8 * k + tig + 4 * j) * 4) >> LOG2M) * 4);
      vaddr[k][j] = s0 + B_BYTES + (off ^ (((off >> 7) & VMASK) << 4));
    }
  const unsigned lay0 = s0 + B_BYTES + V_BYTES + wg * 2048;
  const unsigned meta_addr = lay0 + 4 * (wl * 16 + g * 2 + (tig & 1));
  const unsigned code_addr = lay0 + 256 + 2 * (wl * 32 + lane);
  const unsigned long long desc0 = kmajor_sw128_desc(stages);

  constexpr int NACC = BN / 2;
  float acc[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) acc[i] = 0.f;

  // Half a stage (k-steps 2h, 2h+1) of stage slot `slot`: build their A registers and metadata in `a`/`e`,
  // issue 2 wgmma, commit them as one group. The group in flight keeps reading its registers until its wait,
  // so the two halves use two register sets; each is rebuilt only after the wait that follows the next
  // group's commit. An A register = one chunk = its group's value word permuted by PRMT.
  auto issue_half = [&](const int slot, const int h, unsigned (&a)[2][4], unsigned (&e)[2]) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int k = 2 * h + u;
      const unsigned so = slot * STAGE;
      e[u] = lds_u32(meta_addr + so + k * 512);
      const unsigned w = spread_codes(lds_u16(code_addr + so + k * 512));
      const unsigned sel0 = slot_selectors(w);        // chunks (row0, tig), (row0, tig + 4)
      const unsigned sel1 = slot_selectors(w >> 16);  // chunks (row0 + 8, tig), (row0 + 8, tig + 4)
      a[u][0] = prmt(lds_u32(vaddr[k][0] + so), 0u, sel0);
      a[u][2] = prmt(lds_u32(vaddr[k][1] + so), 0u, sel0 >> 16);
      a[u][1] = prmt(lds_u32(vaddr[k][0] + so + 8 * VROW), 0u, sel1);
      a[u][3] = prmt(lds_u32(vaddr[k][1] + so + 8 * VROW), 0u, sel1 >> 16);
    }
    wgmma_fence();
#pragma unroll
    for (int u = 0; u < 2; ++u)  // k-step 2h + u: box h, bytes 64u.. of each 128-byte row
      wgmma_sp_rs<BF16, BN>(acc, a[u], desc0 + ((slot * STAGE + h * (BN * 128) + u * 64) >> 4), e[u]);
    wgmma_commit();
  };

  unsigned ax[2][4], ex[2], ay[2][4], ey[2];
  for (int i0 = 0; i0 < nst; i0 += S) {
#pragma unroll
    for (int slot = 0; slot < S; ++slot) {
      const int i = i0 + slot;
      if (i >= nst) break;
      mbar_wait(&full[slot], (i0 / S) & 1);
      issue_half(slot, 0, ax, ex);
      wgmma_wait<1>();  // the previous stage's second half is done: that stage may be refilled
      if (i > 0 && lane == 0) mbar_arrive(&empty[(slot + S - 1) % S]);
      issue_half(slot, 1, ay, ey);
      wgmma_wait<1>();
    }
  }
  wgmma_wait<0>();

  // ---- epilogue ----------------------------------------------------------------------------------------
  // accumulator layout (per warp, as mma m16n8): acc[4j + 0, 1] = row g, tokens 8j + 2tig + {0, 1};
  // acc[4j + 2, 3] = row g + 8, same tokens
  const int r0 = m0 + row0;
  if (p.nsplit > 1) {
    float* ws = p.ws + (long long)blockIdx.z * p.T * p.R;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int t = n0 + 8 * j + 2 * tig + (v & 1);
        const int r = r0 + 8 * (v >> 1);
        if (t < p.T && r < p.R) ws[(long long)t * p.R + r] = acc[4 * j + v];
      }
    return;
  }
  const unsigned short* bias16 = reinterpret_cast<const unsigned short*>(p.bias);
  const float b0 = (p.bias && r0 < p.R) ? to_float(bias16[r0], BF16) : 0.f;
  const float b1 = (p.bias && r0 + 8 < p.R) ? to_float(bias16[r0 + 8], BF16) : 0.f;
  // every consumer warpgroup is done with the stages: reuse them as [BN tokens][64 rows + 8] per warpgroup
  asm volatile("bar.sync 1, 512;\n" ::: "memory");
  constexpr int OP = 72;  // halves per staged token row (144 bytes: conflict-free transposed writes)
  unsigned short* os = reinterpret_cast<unsigned short*>(stages) + wg * BN * OP;
  const int lr = wl * 16 + g;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int t = 8 * j + 2 * tig + (v & 1);
      os[t * OP + lr + 8 * (v >> 1)] = from_float<BF16>(acc[4 * j + v] + ((v >> 1) ? b1 : b0));
    }
  asm volatile("bar.sync %0, 128;\n" ::"r"(2 + wg) : "memory");
  unsigned short* y = reinterpret_cast<unsigned short*>(p.y);
  const int rb = m0 + wg * 64;
  const int wtid = tid & 127;
  const bool vec = (p.ldy % 8 == 0) && (rb + 64 <= p.R);
  for (int idx = wtid; idx < BN * 8; idx += 128) {
    const int t = idx >> 3;
    const int ch = idx & 7;
    if (n0 + t >= p.T) continue;
    unsigned short* dst = y + (long long)(n0 + t) * p.ldy + rb + ch * 8;
    const unsigned short* src = os + t * OP + ch * 8;
    if (vec) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int k = 0; k < 8; ++k)
        if (rb + ch * 8 + k < p.R) dst[k] = src[k];
    }
  }
#endif
}

template <bool BF16, int BN, int S>
__global__ void __launch_bounds__(640, 1) spatha_spmm_wg(const __grid_constant__ WgParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  __shared__ __align__(8) unsigned long long full[S];
  __shared__ __align__(8) unsigned long long empty[S];
  // 1024-byte alignment of the swizzled regions
  unsigned char* stages = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  if (threadIdx.x == 512) {  // the producer's first lane
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<unsigned long long>(&p.x_map)) : "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<unsigned long long>(&p.values_map)) : "memory");
#pragma unroll
    for (int i = 0; i < S; ++i) {
      mbar_init(&full[i], 1);
      mbar_init(&empty[i], 16);  // lane 0 of every consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  switch (p.log2m) {  // M = 4, 8, 16, 32 (the host checks)
    case 2: wg_main<BF16, BN, S, 2>(p, stages, full, empty); break;
    case 3: wg_main<BF16, BN, S, 3>(p, stages, full, empty); break;
    case 4: wg_main<BF16, BN, S, 4>(p, stages, full, empty); break;
    default: wg_main<BF16, BN, S, 5>(p, stages, full, empty); break;
  }
#endif
}

}  // namespace venom
