"""Tile configurations of the Spatha kernels (the template instances that are shipped and compiled).

A config is (WM, WN, WARPS_M, WARPS_N, STAGES) plus KW (k-steps per pipeline window); see
csrc/spatha.cuh. CTA tile = (WM*WARPS_M) output features x (WN*WARPS_N) tokens.

The kernels:
* ``v2`` (``spatha_spmm``): reads x as it is (row-major); KW is chosen per call from M so that the
  x span per window stays ~256 columns. WM must divide V. Used for decode / few tokens.
* ``kt`` (``spatha_spmm_kt``, v3): prefill. One transpose of x per call (``spatha_transpose``), then
  16-byte gathers of the selected rows of x^T; KW is fixed per config (the B tile does not depend on
  M). The CTA's rows lie in one V-block: BM must divide V.
* ``stream`` / ``ring`` / ``tma`` (v4, v5, v7): decode, <= 16 tokens.
* ``wg`` (``spatha_spmm_wg``, v8, sm_90a only): prefill with sparse wgmma over the weight read as 2:4;
  256 rows (4 consumer warpgroups) x 128 tokens per CTA, ``stages`` TMA stages of 128 columns.
"""

from __future__ import annotations

from dataclasses import dataclass

KWS = (4, 2, 1)


@dataclass(frozen=True)
class TileConfig:
    name: str
    wm: int
    wn: int
    warps_m: int
    warps_n: int
    stages: int
    kernel: str = "v2"
    kw_fixed: int = 0  # kt configs: the one KW they are built with
    sel: bool = False  # ring configs: x pre-gathered per V-block (v5.1, one 8-token tile)
    pairs_per_stage: int = 0  # tma configs: pairs of k-steps per TMA ring stage

    @property
    def decode(self) -> bool:
        """One of the decode kernels (v4 stream, v5 ring, v7 tma): <= 16 tokens, whole pairs of k-steps."""
        return self.kernel in ("stream", "ring", "tma")

    @property
    def bm(self) -> int:
        return self.wm * self.warps_m if self.kernel != "wg" else 256

    @property
    def bn(self) -> int:
        """Tokens per CTA (ring configs: warps_n counts the warps that split K, not token tiles)."""
        return self.wn if self.kernel in ("ring", "tma") else self.wn * self.warps_n

    @property
    def threads(self) -> int:
        # tma: warps_m consumer warps + the producer warp; wg: 4 consumer warpgroups + the producer warpgroup
        if self.kernel == "wg":
            return 640
        return 32 * (self.warps_m * self.warps_n + (self.kernel == "tma"))

    @property
    def kws(self) -> tuple[int, ...]:
        """The KW values this config is built with."""
        return (self.kw_fixed,) if self.kernel in ("kt", "stream", "ring", "tma", "wg") else KWS

    @property
    def rt(self) -> int:
        """stream configs: 16-row tiles per warp."""
        return self.wm // 16

    def stage_bytes(self, m: int, kw: int) -> int:
        if self.kernel == "kt":  # KtLayout: B tile [KW*32][BN+8] halves + values + metadata
            return kw * 32 * (self.bn + 8) * 2 + self.bm * (kw * 32 + 16) + self.bm * (kw * 8 + 8)
        xpitch = kw * 8 * m + 8
        return self.bn * xpitch * 2 + self.bm * (kw * 32 + 16) + self.bm * (kw * 8 + 8) + self.warps_m * kw * 32

    def smem_bytes(self, m: int, kw: int, steps: int = 0, tokens: int = 0) -> int:
        """Dynamic shared memory of one launch (kt: + the column indices of ``steps`` k-steps; ring: x is
        staged for min(tokens, bn) rows, all bn when tokens is 0)."""
        if self.kernel == "wg":  # per stage: x boxes + values box + chunk layout; + 1 KB for the alignment
            return self.stages * (self.bn * 256 + 256 * 512 // m + 8192) + 1024
        if self.kernel == "ring":  # weight ring + x chunk + column words + the k-split partials
            steps = steps + steps % 2
            rows = min(tokens, self.bn) if tokens else self.bn
            ring = self.warps_m * self.warps_n * self.stages * self.rt * 1280
            red = (self.warps_n - 1) * self.warps_m * self.rt * (self.wn // 8) * 512
            xsel = self.warps_m * rows * (steps * 16 + 16) * 4 if self.sel else 0
            return ring + rows * (steps * 8 * m + 8) * 2 + self.warps_m * steps * 8 * 4 + red + xsel
        if self.kernel == "tma":  # TMA ring + x chunk (min(tokens, bn) rows) + column words per warp
            rows = min(tokens, self.bn) if tokens else self.bn
            ring = self.stages * self.bm * self.pairs_per_stage * 72
            return ring + rows * (steps * 8 * m + 8) * 2 + self.warps_m * steps * 8 * 4
        if self.kernel == "stream":  # x chunk [8*NT][steps*8*M + 8] halves + column words per warp
            steps = steps + steps % 2
            return (self.bn * (steps * 8 * m + 8) * 2) + self.warps_m * steps * 8 * 4
        pipe = self.stages * self.stage_bytes(m, kw)
        if self.kernel == "kt":
            pipe += ((steps * 32 + 127) // 128) * 128
        return max(pipe, self.bn * (self.bm + 8) * 2)

    def expr(self, bf16: bool, kw: int) -> str:
        b = "true" if bf16 else "false"
        if self.kernel == "wg":  # spatha_spmm_wg<BF16, BN, S>
            return f"venom::spatha_spmm_wg<{b}, {self.bn}, {self.stages}>"
        if self.kernel == "ring":  # spatha_spmm_ring<BF16, NT, RT, RW, KS, S[, SEL]>
            sel = ", true" if self.sel else ""
            return (f"venom::spatha_spmm_ring<{b}, {self.wn // 8}, {self.rt}, {self.warps_m}, {self.warps_n}, "
                    f"{self.stages}{sel}>")
        if self.kernel == "tma":  # spatha_spmm_tma<BF16, NT, RT, WR, PP, S>
            return (f"venom::spatha_spmm_tma<{b}, {self.wn // 8}, {self.rt}, {self.warps_m}, {self.pairs_per_stage}, "
                    f"{self.stages}>")
        if self.kernel == "stream":  # spatha_spmm_stream<BF16, NT, RT, WR, UP>; stages = UP
            return f"venom::spatha_spmm_stream<{b}, {self.wn // 8}, {self.rt}, {self.warps_m}, {self.stages}>"
        fn = "spatha_spmm_kt" if self.kernel == "kt" else "spatha_spmm"
        return f"venom::{fn}<{b}, {self.wm}, {self.wn}, {self.warps_m}, {self.warps_n}, {self.stages}, {kw}>"


# The instances the dispatch of ops.py picks (docs/perf-notes.md has the measurements behind each).
CONFIGS: tuple[TileConfig, ...] = (
    # v2 (x read as is): decode fallbacks and 17-64 tokens
    TileConfig("decode16", 16, 16, 4, 1, 4),
    TileConfig("decode16x8", 16, 16, 8, 1, 3),
    TileConfig("large64", 64, 32, 2, 4, 2),
    TileConfig("huge64", 64, 32, 4, 2, 3),
    TileConfig("large32", 32, 64, 4, 2, 2),
    TileConfig("large16", 16, 64, 4, 2, 2),
    # v3 prefill (x^T gather): name = kt<BM>x<BN>[k<KW>]
    TileConfig("kt64x128k2", 64, 32, 1, 4, 3, "kt", 2),
    TileConfig("kt64x256", 64, 64, 1, 4, 3, "kt", 1),
    TileConfig("kt128x128", 64, 64, 2, 2, 4, "kt", 1),
    TileConfig("kt32x128", 32, 32, 1, 4, 4, "kt", 1),
    # v4 decode (register weight stream, one launch incl. split-K): stream_n<NT>r<RT>; WR = 8 warps,
    # UP = 2 pairs in flight per buffer; kw_fixed = 2: splits hold whole pairs of k-steps
    TileConfig("stream_n1r2", 32, 8, 8, 1, 2, "stream", 2),
    TileConfig("stream_n1r1", 16, 8, 8, 1, 2, "stream", 2),
    TileConfig("stream_n2r1", 16, 16, 8, 1, 2, "stream", 2),
    # v5 decode (per-warp cp.async weight ring, K split among the CTA's warps): ring_n<NT>r<RT>[k<KS>|w<RW>];
    # warps_m = RW row warps, warps_n = KS k-split warps, stages = S ring stages: 2 x 4 warps (1-2 tokens),
    # 1 x 8 (small layers), 8 x 1 (9-16 tokens: more rows per CTA, so less x staged per weight byte)
    TileConfig("ring_n1r1", 16, 8, 2, 4, 4, "ring", 2),
    TileConfig("ring_n1r1k8", 16, 8, 1, 8, 4, "ring", 2),
    TileConfig("ring_n2r1", 16, 16, 2, 4, 4, "ring", 2),
    TileConfig("ring_n2r2w8", 32, 16, 8, 1, 3, "ring", 2),
    # v5.2: the ring with x pre-gathered per V-block in B-register order (one 16-byte shared load per
    # k-step), at 1 token on tall layers with K <= 4096
    TileConfig("ring_n1r1sel", 16, 8, 2, 4, 4, "ring", 2, sel=True),
    # v7 decode (sm_90+: TMA-filled CTA-wide weight ring, one producer warp): tma_n<NT>r<RT>w<WR>;
    # warps_m = WR consumer warps of RT 16-row tiles, stages = ring stages of pairs_per_stage pairs
    TileConfig("tma_n1r1w4", 16, 8, 4, 1, 4, "tma", 2, pairs_per_stage=2),
    TileConfig("tma_n1r1w8", 16, 8, 8, 1, 4, "tma", 2, pairs_per_stage=2),
    TileConfig("tma_n1r2w4", 32, 8, 4, 1, 3, "tma", 2, pairs_per_stage=2),
    TileConfig("tma_n2r1w4", 16, 16, 4, 1, 4, "tma", 2, pairs_per_stage=2),
    TileConfig("tma_n2r2w4", 32, 16, 4, 1, 3, "tma", 2, pairs_per_stage=2),
    TileConfig("tma_n1r2w8", 32, 8, 8, 1, 4, "tma", 2, pairs_per_stage=1),
    TileConfig("tma_n2r2w8", 32, 16, 8, 1, 4, "tma", 2, pairs_per_stage=1),
    # v8 prefill (sm_90a: sparse wgmma, the weight as 2:4 over the full K, x tiles by TMA): wg256x<BN>s<S>
    TileConfig("wg256x128s3", 64, 128, 4, 1, 3, "wg", 1),
    TileConfig("wg256x128s4", 64, 128, 4, 1, 4, "wg", 1),
)
BY_NAME = {c.name: c for c in CONFIGS}


def kw_for(m: int) -> int:
    """k-steps per window: 4 for M <= 8, 2 for M = 16, 1 beyond."""
    return 4 if m <= 8 else (2 if m <= 16 else 1)


def reduce_expr(bf16: bool) -> str:
    return f"venom::spatha_splitk_reduce<{'true' if bf16 else 'false'}>"


TRANSPOSE_EXPR = "venom::spatha_transpose"
KT_MAX_STEPS = 512  # kt kernel: column indices of at most this many k-steps per CTA (16 KB smem)


def all_name_expressions() -> list[str]:
    out = []
    for bf16 in (False, True):
        out += [c.expr(bf16, kw) for c in CONFIGS for kw in c.kws]
        out.append(reduce_expr(bf16))
    out.append(TRANSPOSE_EXPR)
    return out
