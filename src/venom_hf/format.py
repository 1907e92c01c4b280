"""The V:N:M format: spec, mask construction, packing, validation and the reference matmul.

Pure torch and device-agnostic: this module is the single source of truth for the layout described in
``docs/format.md``. Every other layer (kernels, modules, HF integration, pruning) builds on it.

V:N:M counts *kept* weights: ``64:2:8`` keeps 2 of every 8 (75 % sparse). A weight ``(R, K)`` is cut
into blocks of V rows x M columns; each block keeps the same 4 columns for all its V rows, and inside
those every row keeps N (N == 2 is what ``mma.sp`` runs).
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = [
    "VNMSpec",
    "VNMFormatError",
    "PackedVNM",
    "make_mask",
    "mask_from_weight",
    "check_mask",
    "pack",
    "unpack",
    "unpack_tensors",
    "validate",
    "validate_tensors",
    "vnm_linear",
    "packed_shapes",
    "wgmma_layout",
    "decode_meta_layout",
]

logger = logging.getLogger("venom_hf")

MAX_M = 256  # column indices are stored in 8 bits
# Column-set search: exhaustive when C(M, kept_columns) is at most this many candidate sets, otherwise
# exhaustive over the L columns with the largest block saliency, with L the largest that fits the budget.
MAX_COLUMN_SETS = 330
# Blocks scored at once; bounds the search's temporary memory to ~ chunk * V * sets * kept_columns floats.
_SEARCH_ELEMS = 1 << 24

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class VNMFormatError(ValueError):
    """A weight, mask or packed tensor violates the V:N:M format."""


# --------------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class VNMSpec:
    """A V:N:M sparsity pattern: blocks of ``v`` rows x ``m`` columns, ``n`` kept per row and group.

    ``VNMSpec.parse("64:2:8")``, ``VNMSpec.parse((64, 2, 8))`` and ``VNMSpec(64, 2, 8)`` are equivalent.
    """

    v: int
    n: int
    m: int

    def __post_init__(self):
        for name in ("v", "n", "m"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                raise VNMFormatError(f"V:N:M spec: {name.upper()} must be an int, got {val!r}")
        if self.v < 1:
            raise VNMFormatError(f"V:N:M spec {self}: V must be >= 1, got V={self.v}")
        if not 4 <= self.m <= MAX_M:
            raise VNMFormatError(
                f"V:N:M spec {self}: M must be in [4, {MAX_M}] (4 columns are kept per block and "
                f"column indices are stored in 8 bits), got M={self.m}"
            )
        if not 1 <= self.n < self.m:
            raise VNMFormatError(f"V:N:M spec {self}: N must satisfy 1 <= N < M, got N={self.n}, M={self.m}")

    @classmethod
    def parse(cls, spec: "VNMSpec | str | tuple | list") -> "VNMSpec":
        if isinstance(spec, VNMSpec):
            return spec
        if isinstance(spec, str):
            parts = spec.strip().split(":")
            if len(parts) != 3:
                raise VNMFormatError(f"V:N:M spec must look like '64:2:8' (three ints separated by ':'), got {spec!r}")
            try:
                v, n, m = (int(p) for p in parts)
            except ValueError:
                raise VNMFormatError(f"V:N:M spec must look like '64:2:8' (three ints), got {spec!r}") from None
            return cls(v, n, m)
        if isinstance(spec, (tuple, list)) and len(spec) == 3:
            return cls(*spec)
        raise VNMFormatError(f"cannot parse a V:N:M spec from {spec!r}; use a string like '64:2:8'")

    def __str__(self) -> str:
        return f"{self.v}:{self.n}:{self.m}"

    @property
    def kept_columns(self) -> int:
        """Columns each V x M block keeps: min(M, max(4, N + 2)); 4 for N <= 2 (what mma.sp reads).

        Growing by one column per extra N keeps a gradual schedule that lowers N one step at a time
        nested: from N+1 kept of (N+3) columns, every row still has N kept entries in the best N+2."""
        return min(self.m, max(4, self.n + 2))

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    @property
    def packable(self) -> bool:
        """Only V:2:M has a packed form (and a kernel)."""
        return self.n == 2


def packed_shapes(out_features: int, in_features: int, spec: VNMSpec | str) -> dict[str, tuple[int, ...]]:
    """Shapes of the packed tensors of an ``(out_features, in_features)`` weight (a pure function)."""
    spec = VNMSpec.parse(spec)
    rb, gp = math.ceil(out_features / spec.v), _round_up(math.ceil(in_features / spec.m), 8)
    rp = rb * spec.v
    return {"values": (rp, gp, 2), "columns": (rb, gp, 4), "meta": (rp, gp)}


def _round_up(x: int, k: int) -> int:
    return (x + k - 1) // k * k


# --------------------------------------------------------------------------------------------- masks
def _check_matrix(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise VNMFormatError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise VNMFormatError(f"{what} must be 2-D (out_features, in_features), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise VNMFormatError(f"{what} is empty (shape {tuple(t.shape)})")


def _check_float_finite(t: torch.Tensor, what: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise VNMFormatError(f"{what} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise VNMFormatError(f"{what} has {int(bad.sum())} non-finite entries (first at {idx}: {t[idx].item()})")


@lru_cache(maxsize=None)
def _column_sets(n_candidates: int, k: int) -> torch.Tensor:
    return torch.tensor(list(itertools.combinations(range(n_candidates), k)), dtype=torch.long)


@lru_cache(maxsize=None)
def _set_pairs(n_candidates: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All column pairs (P, 2) and, for each k-set, the indices of its C(k, 2) pairs (C, C(k, 2))."""
    pairs = list(itertools.combinations(range(n_candidates), 2))
    index = {p: i for i, p in enumerate(pairs)}
    sets = _column_sets(n_candidates, k).tolist()
    of_set = [[index[(s[i], s[j])] for i, j in itertools.combinations(range(k), 2)] for s in sets]
    return torch.tensor(pairs, dtype=torch.long), torch.tensor(of_set, dtype=torch.long)


def _n_candidates(m: int, k: int) -> int:
    """Largest L <= m with C(L, k) <= MAX_COLUMN_SETS (at least k)."""
    if math.comb(m, k) <= MAX_COLUMN_SETS:
        return m
    L = k
    while L < m and math.comb(L + 1, k) <= MAX_COLUMN_SETS:
        L += 1
    return L


def _select_block_columns(S: torch.Tensor, spec: VNMSpec) -> torch.Tensor:
    """S: (Rb, V, G, M) float scores (higher = keep). Returns bool (Rb, G, M): the columns each block keeps."""
    rb, v, g, m = S.shape
    k = spec.kept_columns
    if k >= m:
        return torch.ones(rb, g, m, dtype=torch.bool, device=S.device)
    blocks = S.permute(0, 2, 1, 3).reshape(rb * g, v, m)  # (B, V, M)
    L = _n_candidates(m, k)
    if L < m:  # pre-select the L columns with the largest block saliency
        cand = blocks.sum(1).topk(L, dim=-1).indices.sort(-1).values  # (B, L)
        cand_scores = blocks.gather(2, cand[:, None, :].expand(-1, v, -1))  # (B, V, L)
    else:
        cand = None
        cand_scores = blocks
    sets = _column_sets(L, k).to(S.device)  # (C, k)
    n_sets = sets.shape[0]
    keep_n = min(spec.n, k)
    best = torch.empty(rb * g, dtype=torch.long, device=S.device)
    chunk = max(1, _SEARCH_ELEMS // (v * n_sets * k))
    if keep_n == 2:  # a row's best 2 inside a set is its best pair: a max over pair sums beats topk ~2x
        pairs, pairs_of_set = (t.to(S.device) for t in _set_pairs(L, k))
    for s in range(0, rb * g, chunk):
        cs = cand_scores[s : s + chunk]  # (b, V, L)
        if keep_n == 2:
            pair_sums = cs[:, :, pairs[:, 0]] + cs[:, :, pairs[:, 1]]  # (b, V, P)
            row_best = pair_sums[:, :, pairs_of_set].amax(-1)  # (b, V, C)
        else:
            row_best = cs[:, :, sets].topk(keep_n, dim=-1).values.sum(-1)  # (b, V, C): each row's best N
        best[s : s + chunk] = row_best.sum(1).argmax(-1)  # (b,)
    chosen = sets[best]  # (B, k) indices into the candidates
    if cand is not None:
        chosen = cand.gather(1, chosen)
    colmask = torch.zeros(rb * g, m, dtype=torch.bool, device=S.device)
    colmask.scatter_(1, chosen, True)
    return colmask.view(rb, g, m)


def make_mask(
    weight: torch.Tensor,
    spec: VNMSpec | str,
    scores: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean V:N:M mask of ``weight`` (R, K) that keeps the most salient entries (|w| by default).

    Per block of V rows x M columns, picks the set of ``spec.kept_columns`` columns that maximises the sum
    over the block's rows of each row's best N scores inside the set; then each row keeps its N best
    entries of that set. Rows/columns beyond a multiple of V/M are handled by padding with scores below
    every real score, so a padded position is never preferred to a real one.

    ``allowed`` (bool, R x K) restricts the mask to a subset (e.g. the previous mask of a gradual
    schedule): whenever a V:N:M mask inside ``allowed`` exists, the result lies inside it.
    """
    spec = VNMSpec.parse(spec)
    _check_matrix(weight, "weight")
    if scores is None:
        _check_float_finite(weight, "weight")
        scores = weight.detach().abs()
    else:
        _check_matrix(scores, "scores")
        if scores.shape != weight.shape:
            raise VNMFormatError(f"scores shape {tuple(scores.shape)} != weight shape {tuple(weight.shape)}")
        _check_float_finite(scores, "scores")
    R, K = weight.shape
    S = scores.detach().to(torch.float64 if scores.dtype == torch.float64 or allowed is not None else torch.float32)
    if allowed is not None:
        if allowed.shape != weight.shape or allowed.dtype != torch.bool:
            raise VNMFormatError(f"allowed must be a bool tensor of shape {tuple(weight.shape)}")
        # Disallowed entries score so low that a set needing one loses to every set that needs none.
        S = S - S.min()
        penalty = (float(S.max()) + 1.0) * spec.v * spec.m + 1.0
        S = torch.where(allowed.to(S.device), S, torch.full_like(S, -penalty))
    rb, g = math.ceil(R / spec.v), math.ceil(K / spec.m)
    if rb * spec.v != R or g * spec.m != K:
        pad_value = float(S.min()) - 1.0 - abs(float(S.min()))
        S = F.pad(S, (0, g * spec.m - K, 0, rb * spec.v - R), value=pad_value)
    S = S.view(rb, spec.v, g, spec.m)
    colmask = _select_block_columns(S, spec)  # (Rb, G, M)
    # each row keeps its N best entries among the block's columns
    masked = S.masked_fill(~colmask[:, None], float("-inf"))
    keep = masked.topk(spec.n, dim=-1).indices
    mask = torch.zeros_like(S, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.view(rb * spec.v, g * spec.m)[:R, :K].contiguous()


def mask_from_weight(weight: torch.Tensor, spec: VNMSpec | str) -> torch.Tensor:
    """The V:N:M mask implied by a weight's zeros (e.g. a zeros-baked "dense" checkpoint).

    Every non-zero is kept; the rest of the structure is completed with zeros. Raises VNMFormatError
    when the non-zeros do not fit the V:N:M pattern.
    """
    spec = VNMSpec.parse(spec)
    _check_matrix(weight, "weight")
    nonzero = weight != 0
    mask = make_mask(weight, spec, scores=nonzero.float())
    missed = nonzero & ~mask
    if bool(missed.any()):
        r, c = (int(i) for i in missed.nonzero()[0])
        raise VNMFormatError(
            f"weight of shape {tuple(weight.shape)} is not {spec}-sparse: {int(missed.sum())} non-zeros do not fit "
            f"the pattern (first at row {r}, column {c}); prune it first (venom_hf.format.make_mask)"
        )
    return mask


def check_mask(mask: torch.Tensor, spec: VNMSpec | str) -> None:
    """Raise VNMFormatError unless ``mask`` (bool, R x K) has exactly the V:N:M structure of ``spec``.

    Each row keeps exactly min(N, width) entries of each group (width = M, or K % M for a last partial
    group) and each V x M block uses at most ``spec.kept_columns`` distinct columns.
    """
    spec = VNMSpec.parse(spec)
    _check_matrix(mask, "mask")
    if mask.dtype != torch.bool:
        raise VNMFormatError(f"mask must be torch.bool, got {mask.dtype}")
    R, K = mask.shape
    rb, g = math.ceil(R / spec.v), math.ceil(K / spec.m)
    padded = F.pad(mask, (0, g * spec.m - K, 0, rb * spec.v - R)).view(rb, spec.v, g, spec.m)
    widths = torch.full((g,), spec.m, device=mask.device)
    widths[-1] = K - (g - 1) * spec.m
    per_row = padded.sum(-1)[:, :, :]  # (Rb, V, G)
    want = widths.clamp(max=spec.n)
    rows_real = torch.arange(rb * spec.v, device=mask.device).view(rb, spec.v) < R
    bad = (per_row != want) & rows_real[..., None]
    if bool(bad.any()):
        b, r, gg = (int(i) for i in bad.nonzero()[0])
        raise VNMFormatError(
            f"mask is not {spec}: row {b * spec.v + r} keeps {int(per_row[b, r, gg])} entries in column group {gg} "
            f"(columns {gg * spec.m}..{min(K, (gg + 1) * spec.m) - 1}), expected {int(want[gg])}"
        )
    used = padded.any(1).sum(-1)  # (Rb, G)
    bad = used > spec.kept_columns
    if bool(bad.any()):
        b, gg = (int(i) for i in bad.nonzero()[0])
        raise VNMFormatError(
            f"mask is not {spec}: block of rows {b * spec.v}..{min(R, (b + 1) * spec.v) - 1} x column group {gg} "
            f"uses {int(used[b, gg])} distinct columns, at most {spec.kept_columns} allowed"
        )


# --------------------------------------------------------------------------------------------- packing
@dataclass
class PackedVNM:
    """A V:2:M weight in the canonical packed layout of docs/format.md."""

    values: torch.Tensor  # (Rp, Gp, 2) weight dtype
    columns: torch.Tensor  # (Rb, Gp, 4) uint8, ascending, in [0, M)
    meta: torch.Tensor  # (Rp, Gp) uint8: pos0 | pos1 << 2
    shape: tuple[int, int]  # original (out_features, in_features)
    spec: VNMSpec

    def to(self, *args, **kwargs) -> "PackedVNM":
        """Move to a device; a dtype argument casts ``values`` only (indices stay uint8)."""
        values = self.values.to(*args, **kwargs)
        device = values.device
        return PackedVNM(values, self.columns.to(device), self.meta.to(device), self.shape, self.spec)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.columns, self.meta))


_logged_padding: set = set()


def _fill_to(selected: torch.Tensor, count: int) -> torch.Tensor:
    """selected: bool (..., W) with at most ``count`` True. Returns (..., count) ascending indices: the
    selected ones, completed with the lowest unselected indices."""
    w = selected.shape[-1]
    key = (~selected).to(torch.int64) * w + torch.arange(w, device=selected.device)
    return key.topk(count, dim=-1, largest=False).indices.sort(-1).values


def pack(weight: torch.Tensor, spec: VNMSpec | str, mask: torch.Tensor | None = None) -> PackedVNM:
    """Pack ``weight`` (R, K) with a V:2:M ``mask`` (default: ``make_mask(weight, spec)``).

    Entries outside the mask are dropped (they are zero in ``unpack``). Shapes that are not multiples
    of V (rows) or M (columns) are padded; ``unpack`` and ``vnm_linear`` slice the padding back off.
    """
    spec = VNMSpec.parse(spec)
    if not spec.packable:
        raise VNMFormatError(f"only V:2:M can be packed (mma.sp runs 2:4), got {spec}; keep N > 2 as a mask")
    _check_matrix(weight, "weight")
    _check_float_finite(weight, "weight")
    if mask is None:
        mask = make_mask(weight, spec)
    else:
        if mask.shape != weight.shape:
            raise VNMFormatError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
        mask = mask.to(device=weight.device, dtype=torch.bool)
    check_mask(mask, spec)
    R, K = weight.shape
    shapes = packed_shapes(R, K, spec)
    rp, gp, _ = shapes["values"]
    rb = shapes["columns"][0]
    if (rp, gp * spec.m) != (R, K) and (R, K, str(spec)) not in _logged_padding:
        _logged_padding.add((R, K, str(spec)))
        logger.info(
            "venom_hf: padding a %dx%d weight to %dx%d for %s (stored groups are a multiple of 8); "
            "outputs are sliced back",
            R, K, rp, gp * spec.m, spec,
        )
    wm = torch.where(mask, weight.detach(), torch.zeros((), dtype=weight.dtype, device=weight.device))
    wm = F.pad(wm, (0, gp * spec.m - K, 0, rp - R)).view(rb, spec.v, gp, spec.m)
    mk = F.pad(mask, (0, gp * spec.m - K, 0, rp - R)).view(rb, spec.v, gp, spec.m)
    columns = _fill_to(mk.any(1), 4)  # (Rb, Gp, 4)
    cols_rows = columns[:, None].expand(rb, spec.v, gp, 4)
    in4 = mk.gather(-1, cols_rows)  # (Rb, V, Gp, 4)
    pos = _fill_to(in4, 2)  # (Rb, V, Gp, 2)
    values = wm.gather(-1, cols_rows.gather(-1, pos))
    meta = pos[..., 0] | (pos[..., 1] << 2)
    return PackedVNM(
        values=values.reshape(rp, gp, 2).contiguous(),
        columns=columns.to(torch.uint8).contiguous(),
        meta=meta.reshape(rp, gp).to(torch.uint8).contiguous(),
        shape=(R, K),
        spec=spec,
    )


def unpack_tensors(values, columns, meta, shape, spec) -> torch.Tensor:
    """Dense (R, K) weight from the canonical packed tensors (the exact inverse of ``pack``)."""
    spec = VNMSpec.parse(spec)
    R, K = shape
    rp, gp, _ = values.shape
    rb = columns.shape[0]
    pos = torch.stack([meta & 3, (meta >> 2) & 3], -1).long().view(rb, spec.v, gp, 2)
    cols = columns.long()[:, None].expand(rb, spec.v, gp, 4).gather(-1, pos)  # (Rb, V, Gp, 2) in [0, M)
    dense = torch.zeros(rb, spec.v, gp, spec.m, dtype=values.dtype, device=values.device)
    # scatter_add: two kept values never share a column (pos0 < pos1), and padding adds exact zeros
    dense.scatter_add_(-1, cols, values.view(rb, spec.v, gp, 2))
    return dense.view(rp, gp * spec.m)[:R, :K].contiguous()


def unpack(packed: PackedVNM) -> torch.Tensor:
    """Dense (R, K) weight with zeros at pruned positions."""
    return unpack_tensors(packed.values, packed.columns, packed.meta, packed.shape, packed.spec)


def validate_tensors(values, columns, meta, shape, spec, *, prefix: str = "", check_values: bool = True) -> None:
    """Check packed tensors against the format (shapes, dtypes, index ranges, padding); raise a
    VNMFormatError naming the offending tensor. ``prefix`` is prepended to tensor names in messages."""
    spec = VNMSpec.parse(spec)
    if not spec.packable:
        raise VNMFormatError(f"packed weights must be V:2:M, got {spec}")
    R, K = shape
    want = packed_shapes(R, K, spec)
    for name, t in (("values", values), ("columns", columns), ("meta", meta)):
        if not isinstance(t, torch.Tensor):
            raise VNMFormatError(f"{prefix}{name}: expected a tensor, got {type(t).__name__}")
        if tuple(t.shape) != want[name]:
            raise VNMFormatError(
                f"{prefix}{name}: shape {tuple(t.shape)} does not match a {R}x{K} weight in {spec} "
                f"(expected {want[name]})"
            )
    if values.dtype not in _FLOAT_DTYPES:
        raise VNMFormatError(f"{prefix}values: dtype {values.dtype} is not a floating dtype")
    for name, t in (("columns", columns), ("meta", meta)):
        if t.dtype != torch.uint8:
            raise VNMFormatError(f"{prefix}{name}: dtype must be torch.uint8, got {t.dtype}")
    if values.device.type == "meta":
        return
    c = columns.long()
    if bool((c >= spec.m).any()):
        raise VNMFormatError(f"{prefix}columns: {int((c >= spec.m).sum())} indices out of range [0, {spec.m})")
    if bool((c[..., 1:] <= c[..., :-1]).any()):
        raise VNMFormatError(f"{prefix}columns: the 4 column indices of a block must be strictly ascending")
    mt = meta.long()
    p0, p1 = mt & 3, (mt >> 2) & 3
    if bool((mt >> 4).any()) or bool((p0 >= p1).any()):
        raise VNMFormatError(
            f"{prefix}meta: {int(((mt >> 4) != 0).sum() + (p0 >= p1).sum())} entries are not a valid 2:4 nibble "
            "(pos0 < pos1 <= 3, upper 4 bits zero)"
        )
    if check_values:
        if not bool(torch.isfinite(values).all()):
            raise VNMFormatError(f"{prefix}values: {int((~torch.isfinite(values)).sum())} non-finite entries")
        rb, gp = columns.shape[:2]
        absolute = c + torch.arange(gp, device=c.device)[:, None] * spec.m  # (Rb, Gp, 4)
        pos = torch.stack([p0, p1], -1).view(rb, spec.v, gp, 2)
        col_of_value = absolute[:, None].expand(rb, spec.v, gp, 4).gather(-1, pos).reshape(values.shape)
        pad = col_of_value >= K
        pad[R:] = True
        if bool((values[pad] != 0).any()):
            raise VNMFormatError(f"{prefix}values: non-zero values stored in padding (rows >= {R} or columns >= {K})")


def validate(packed: PackedVNM) -> None:
    """Raise VNMFormatError if ``packed`` is corrupt (shapes, dtypes, index ranges, padding)."""
    validate_tensors(packed.values, packed.columns, packed.meta, packed.shape, packed.spec)


# --------------------------------------------------------------------------------------------- reference
def vnm_linear(x: torch.Tensor, packed: PackedVNM, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference ``y = x @ W^T + bias`` for a packed weight, on any device: x (..., K) -> (..., R).

    Exactly ``F.linear(x, weight * mask, bias)``: the weight is unpacked and multiplied densely.
    """
    R, K = packed.shape
    if x.shape[-1] != K:
        raise VNMFormatError(f"input has {x.shape[-1]} features, the packed weight expects {K} (shape {R}x{K})")
    if bias is not None and tuple(bias.shape) != (R,):
        raise VNMFormatError(f"bias must have shape ({R},), got {tuple(bias.shape)}")
    w = unpack(packed).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# --------------------------------------------------------------------------------------------- device layouts
def decode_meta_layout(meta: torch.Tensor) -> torch.Tensor:
    """The metadata of the sm_90 decode kernel (``spatha_spmm_tma``, csrc/spatha.cuh) in the order its lanes
    use it: the ``mma.sp.m16n8k32`` sparsity register of every lane, per 16-row tile and pair of k-steps (16
    groups). Derived from ``meta`` only (not stored, not saved); half its bytes (the canonical upper nibbles
    are zero and dropped).

    ``meta``: ``(Rp, Gp)`` uint8 with ``Rp % 16 == 0`` and ``Gp % 16 == 0``. Returns int32 ``(Rp/16, Gp/16,
    32)``; byte ``j = 2h + p`` (little-endian) of word ``[t, u, 4g + q]`` is ``n(r, c) | n(r, c + 4) << 4``
    with ``n`` the canonical nibble, row ``r = 16t + g + 8h``, group ``c = 16u + 8p + q``.
    """
    rp, gp = meta.shape
    if meta.dtype != torch.uint8 or rp % 16 or gp % 16:
        raise VNMFormatError(f"decode_meta_layout needs uint8 meta of (16k, 16l) entries, got {meta.dtype} "
                             f"{tuple(meta.shape)}")
    n = (meta & 0x0F).view(rp // 16, 2, 8, gp // 16, 2, 2, 4)  # (t, h, g, u, p, lo/hi, q)
    b = n[..., 0, :] | (n[..., 1, :] << 4)  # (t, h, g, u, p, q)
    b = b.permute(0, 3, 2, 5, 1, 4).contiguous()  # (t, u, g, q, h, p): bytes of word 4g + q
    return b.view(rp // 16, gp // 16, 32, 4).view(torch.int32).view(rp // 16, gp // 16, 32)


WGMMA_TILE_ROWS = 64  # rows per wgmma warpgroup tile
WGMMA_CTA_ROWS = 256  # rows per CTA of the sm_90a kernel (the layout covers whole CTAs)
WGMMA_STAGE_STEPS = 4  # 32-column k-steps per pipeline stage (the layout covers whole stages)


def wgmma_layout(columns: torch.Tensor, meta: torch.Tensor, spec: VNMSpec | str, rows: int) -> torch.Tensor:
    """The chunk layout of the sm_90a kernel (``spatha_spmm_wg``, csrc/spatha.cuh): the packed weight read
    as plain 2:4 over its full padded width. Derived from ``columns``/``meta`` only (not stored, not saved);
    the kernel takes the 2 kept values of each group straight from the canonical ``values``.

    Every 4-column chunk of a V:2:M row holds at most 2 kept values. Per (row, chunk): the two 2:4 slots'
    positions in the chunk (``idx0 < idx1``, the metadata nibble ``idx0 | idx1 << 2``) and their sources
    ``s0``, ``s1`` (0: the group's first kept value, 1: its second, 2: zero), as a nibble ``s0 | s1 << 2``.
    Returned as uint8 ``(tiles, steps, 512)``: tiles of 64 rows (``roundup(rows, 256) / 64``; rows >= ``rows``
    and chunks past the stored groups are all-zero slots), k-steps of 32 columns (a multiple of 4); per
    (tile, k-step), in the order the kernel's threads read them:
      bytes 0..255: 64 little-endian words, word ``w*16 + g*2 + h`` = nibbles of chunks ``4h..4h+3`` of row
        ``16w + g`` (bits 0-15) and of row ``16w + g + 8`` (bits 16-31): the wgmma metadata register;
      bytes 256..511: 128 half-words, half-word ``w*32 + g*4 + t`` = source nibbles of chunks ``t``, ``t+4``
        of row ``16w + g`` (bits 0-3, 4-7) and of row ``16w + g + 8`` (bits 8-11, 12-15).
    """
    spec = VNMSpec.parse(spec)
    if spec.m % 4:
        raise VNMFormatError(f"wgmma_layout needs M % 4 == 0 (chunks of 4 columns inside one group), got M={spec.m}")
    rb, gp = columns.shape[:2]
    rp = meta.shape[0]
    if rp != rb * spec.v or rows > rp:
        raise VNMFormatError(f"wgmma_layout: meta has {rp} rows, columns {rb} blocks of V={spec.v}, rows={rows}")
    nks = _round_up(_round_up(gp * spec.m, 32) // 32, WGMMA_STAGE_STEPS)
    rpad = _round_up(max(rows, 1), WGMMA_CTA_ROWS)
    step = 8 * WGMMA_CTA_ROWS  # rows per pass: bounded temporaries on big layers
    parts = [_wgmma_layout_rows(columns, meta, spec, rows, r0, min(rpad, r0 + step), nks)
             for r0 in range(0, rpad, step)]
    return torch.cat(parts, 0)


def _wgmma_layout_rows(columns, meta, spec: VNMSpec, rows: int, r0: int, r1: int, nks: int) -> torch.Tensor:
    """``wgmma_layout`` for rows r0..r1-1 (whole 64-row tiles)."""
    dev = columns.device
    gp = columns.shape[1]
    nq = nks * 8  # chunks
    q = torch.arange(nq, device=dev)
    grp = (4 * q) // spec.m
    off = (4 * q) % spec.m
    gvalid = grp < gp
    grp = grp.clamp(max=gp - 1)
    nib = torch.full((r1 - r0, nq), 0b0100, dtype=torch.long, device=dev)  # no kept value: slots (0, 1) ...
    src = torch.full((r1 - r0, nq), 0b1010, dtype=torch.long, device=dev)  # ... both zero
    hi = min(rows, r1)
    if hi > r0:
        r = torch.arange(r0, hi, device=dev)
        m8 = meta[r0:hi].long()[:, grp]  # (rows, nq)
        cols = columns[r // spec.v].long()[:, grp]  # (rows, nq, 4)
        c0 = cols.gather(-1, (m8 & 3)[..., None])[..., 0] - off
        c1 = cols.gather(-1, ((m8 >> 2) & 3)[..., None])[..., 0] - off
        del cols
        in0 = (c0 >= 0) & (c0 < 4) & gvalid
        in1 = (c1 >= 0) & (c1 < 4) & gvalid
        idx0 = torch.zeros_like(c0)
        idx1 = torch.ones_like(c0)
        s0 = torch.full_like(c0, 2)
        s1 = torch.full_like(c0, 2)
        both = in0 & in1
        idx0 = torch.where(both, c0, idx0)
        idx1 = torch.where(both, c1, idx1)
        s0 = torch.where(both, 0, s0)
        s1 = torch.where(both, 1, s1)
        for inside, c, s in ((in0 & ~in1, c0, 0), (in1 & ~in0, c1, 1)):
            low = inside & (c < 3)  # the value in slot 0 at c, a zero in slot 1 at 3
            high = inside & (c == 3)  # a zero in slot 0 at 0, the value in slot 1 at 3
            idx0 = torch.where(low, c, torch.where(high, 0, idx0))
            idx1 = torch.where(low | high, 3, idx1)
            s0 = torch.where(low, s, torch.where(high, 2, s0))
            s1 = torch.where(low, 2, torch.where(high, s, s1))
        nib[: hi - r0] = idx0 | (idx1 << 2)
        src[: hi - r0] = s0 | (s1 << 2)
    tiles = (r1 - r0) // WGMMA_TILE_ROWS
    shift4 = 4 * torch.arange(4, device=dev)
    # rows: 64t + 16w + 8*half + g; chunks: 8k + 4h + j
    nib = nib.view(tiles, 4, 2, 8, nks, 2, 4)
    words = (nib << shift4).sum(-1)  # (t, w, half, g, k, h)
    words = words[:, :, 0] | (words[:, :, 1] << 16)  # (t, w, g, k, h)
    words = words.permute(0, 3, 1, 2, 4).reshape(tiles, nks, 64)
    # chunks: 8k + 4*hi + t (hi: chunk t or t + 4)
    src = src.view(tiles, 4, 2, 8, nks, 2, 4)
    halves = (src[:, :, 0, :, :, 0] | (src[:, :, 0, :, :, 1] << 4) | (src[:, :, 1, :, :, 0] << 8)
              | (src[:, :, 1, :, :, 1] << 12))  # (t, w, g, k, tig)
    halves = halves.permute(0, 3, 1, 2, 4).reshape(tiles, nks, 128)
    shift8 = 8 * torch.arange(4, device=dev)
    wbytes = ((words[..., None] >> shift8) & 255).to(torch.uint8)  # (t, k, 64, 4)
    hbytes = ((halves[..., None] >> shift8[:2]) & 255).to(torch.uint8)  # (t, k, 128, 2)
    return torch.cat([wbytes.reshape(tiles, nks, 256), hbytes.reshape(tiles, nks, 256)], -1)
