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

// D += A(16x32, 2:4 sparse) * B(32x8), fp32 accumulate. Metadata selector 0 (threads 0,1 of a quad).
template <bool BF16>
__device__ __forceinline__ void mma_sp_16832(float* d, const unsigned* a, const unsigned* b,
                                             unsigned e) {
#if defined(VENOM_PLAIN_MMA_SP)
#define VENOM_MMA_SP "mma.sp.sync.aligned.m16n8k32.row.col.f32."
#else
#define VENOM_MMA_SP "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32."
#endif
  if (BF16) {
    asm volatile(VENOM_MMA_SP "bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, "
                 "{%0,%1,%2,%3}, %12, 0x0;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
                   "r"(b[3]), "r"(e));
  } else {
    asm volatile(VENOM_MMA_SP "f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, "
                 "{%0,%1,%2,%3}, %12, 0x0;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
                   "r"(b[3]), "r"(e));
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
  void* xt;        // (K, ldt)
  long long ldx;
  long long ldt;
  int T, K;
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
    if (kk < p.K && tt < p.ldt) {
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

}  // namespace venom
