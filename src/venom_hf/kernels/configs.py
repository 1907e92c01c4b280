"""Tile configurations of the Spatha kernel (the template instances that are shipped and compiled).

A config is (WM, WN, WARPS_M, WARPS_N, STAGES) plus KW (k-steps per pipeline window, a template
parameter chosen per call from M so that the x span per window stays ~256 columns); see
csrc/spatha.cuh. CTA tile = (WM*WARPS_M) output features x (WN*WARPS_N) tokens. WM must divide V.
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

    @property
    def bm(self) -> int:
        return self.wm * self.warps_m

    @property
    def bn(self) -> int:
        return self.wn * self.warps_n

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    def stage_bytes(self, m: int, kw: int) -> int:
        xpitch = kw * 8 * m + 8
        return self.bn * xpitch * 2 + self.bm * (kw * 32 + 16) + self.bm * (kw * 8 + 8) + self.warps_m * kw * 32

    def smem_bytes(self, m: int, kw: int) -> int:
        return max(self.stages * self.stage_bytes(m, kw), self.bn * (self.bm + 8) * 2)

    def expr(self, bf16: bool, kw: int) -> str:
        b = "true" if bf16 else "false"
        return (
            f"venom::spatha_spmm<{b}, {self.wm}, {self.wn}, {self.warps_m}, {self.warps_n}, {self.stages}, {kw}>"
        )


# Shape classes: decode (<= 16 tokens), small (<= 64), prefill. Variants for V = 16 / 32.
CONFIGS: tuple[TileConfig, ...] = (
    TileConfig("decode16", 16, 16, 4, 1, 4),
    TileConfig("decode64", 64, 16, 2, 1, 4),
    TileConfig("decode16x8", 16, 16, 8, 1, 3),
    TileConfig("small32", 32, 32, 4, 1, 3),
    TileConfig("large64", 64, 32, 2, 4, 2),
    TileConfig("large64s3", 64, 32, 2, 4, 3),
    TileConfig("huge64", 64, 32, 4, 2, 3),
    TileConfig("large32", 32, 64, 4, 2, 2),
    TileConfig("large16", 16, 64, 4, 2, 2),
)
BY_NAME = {c.name: c for c in CONFIGS}


def kw_for(m: int) -> int:
    """k-steps per window: 4 for M <= 8, 2 for M = 16, 1 beyond."""
    return 4 if m <= 8 else (2 if m <= 16 else 1)


def reduce_expr(bf16: bool) -> str:
    return f"venom::spatha_splitk_reduce<{'true' if bf16 else 'false'}>"


def all_name_expressions() -> list[str]:
    out = []
    for bf16 in (False, True):
        out += [c.expr(bf16, kw) for c in CONFIGS for kw in KWS]
        out.append(reduce_expr(bf16))
    return out
