"""Saliency scores and mask selection for V:N:M pruning.

* **Magnitude**: keep-score ``|w|``, column choice by :func:`venom_hf.format.make_mask`.
* **Second order (oBERT / empirical-Fisher OBS)**, arXiv 2203.07259 and venom-notes.md §4:

  - :class:`EmpiricalBlockFisherInverse` holds ``F^-1`` of ``F = damp*I + (1/m) sum_i g_i g_i^T`` restricted to
    blocks of ``B`` consecutive weights of each row (B a multiple of M, so every row's M-group lies in one
    block), built with Woodbury updates of rank ``c <= B`` (``c = 1`` is oBERT's Sherman-Morrison update).
    Memory: ``R * ceil(K/B) * B^2`` floats per ``(R, K)`` layer, i.e. ``B`` floats per weight (8 x the fp32
    weight for B = 8, 32 x for B = 32), see :meth:`EmpiricalBlockFisherInverse.memory_bytes`.
  - Saliency of pruning a set Q of a group with the rest of its Fisher block free to compensate:
    ``rho_Q = 1/2 w_Q^T [(F^-1)_QQ]^-1 w_Q``. With ``H = [(F^-1)_gg]^-1`` (the group's M x M effective
    Hessian) the same number is ``rho(keep K) = 1/2 (w^T H w - u_K^T H_KK^-1 u_K)``, ``u = H w``: one
    N x N solve per *kept* set instead of one (M-N) x (M-N) solve per pruned set (2 x 2 for the final 2:M).
  - Column choice (:func:`select_keepsets`): for every V x M block, exhaustive over the C(M, k) column sets
    (k = ``spec.kept_columns``): each row keeps its best N-subset inside the set (the one with the smallest
    rho), the block's cost is the sum over its V rows, the cheapest set wins. With N = 2 this is the
    "per-pair saliency summed over the V rows" choice, exact for the OBS model (the original's C(M,4)*6
    solves per group become C(M,2) 2x2 solves per row plus gathers). When C(M, N) or C(M, k) * C(k, N) is
    too large (large intermediate N at M = 16), it falls back to per-element OBS saliency
    ``w_i^2 / (2 [F^-1]_ii)`` and :func:`venom_hf.format.make_mask`.
  - OBS update (:func:`obs_update`): ``dw = -F^-1 e_Q [(F^-1)_QQ]^-1 w_Q`` jointly over every pruned weight
    of a Fisher block (earlier pruned weights included, so they stay zero), then pruned weights are zeroed.

Everything is batched torch on the weight's device (GPU when the model is there); small solves run in
float64 and are chunked so that temporaries stay below ~``_CHUNK_ELEMS`` elements.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..format import VNMSpec, make_mask

__all__ = [
    "EmpiricalBlockFisherInverse",
    "magnitude_scores",
    "group_hessians",
    "keepset_saliency",
    "element_saliency",
    "select_keepsets",
    "obs_mask",
    "obs_update",
    "keep_sets",
    "exact_search_feasible",
]

_CHUNK_ELEMS = 1 << 24
# Exact keep-set search limits (per row-group: C(M, N) kept sets, C(M, k) * C(k, N) patterns per block).
MAX_KEEP_SETS = 600
MAX_PATTERNS = 16384


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """Keep-score of magnitude pruning: ``|w|``."""
    return weight.detach().abs()


# --------------------------------------------------------------------------------------------- Fisher
class EmpiricalBlockFisherInverse:
    """Block-diagonal inverse empirical Fisher of one ``(R, K)`` weight, blocks of ``block_size`` weights per row.

    ``F = damp * I + (1/num_grads) * sum_i g_i g_i^T`` (per block); ``update(grads)`` applies the rank-c
    Woodbury identity ``F^-1 <- F^-1 - F^-1 G^T (m I + G F^-1 G^T)^-1 G F^-1`` with ``m = num_grads``.
    Columns beyond K (when B does not divide K) are padding with zero gradients. Storage dtype is
    ``dtype`` (float32 by default); the update is computed in float64.
    """

    def __init__(self, shape, block_size: int, damp: float = 1e-7, num_grads: int = 1024,
                 device=None, dtype: torch.dtype = torch.float32):
        R, K = (int(s) for s in shape)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if damp <= 0:
            raise ValueError(f"damp must be > 0, got {damp}")
        self.shape = (R, K)
        self.block_size = B = int(block_size)
        self.nb = math.ceil(K / B)
        self.damp = float(damp)
        self.num_grads = int(num_grads)
        self.count = 0
        eye = torch.eye(B, device=device, dtype=dtype) / self.damp
        self.finv = eye.expand(R, self.nb, B, B).contiguous()

    @staticmethod
    def memory_bytes_for(shape, block_size: int, dtype: torch.dtype = torch.float32) -> int:
        R, K = shape
        return R * math.ceil(K / block_size) * block_size**2 * torch.empty((), dtype=dtype).element_size()

    def memory_bytes(self) -> int:
        return self.finv.numel() * self.finv.element_size()

    @torch.no_grad()
    def update(self, grads: torch.Tensor) -> None:
        """Add gradient samples ``grads`` of shape (c, R, K) or (R, K); any c (split into rank-B updates)."""
        if grads.dim() == 2:
            grads = grads[None]
        R, K = self.shape
        if tuple(grads.shape[1:]) != (R, K):
            raise ValueError(f"gradient shape {tuple(grads.shape[1:])} != weight shape {(R, K)}")
        B, nb = self.block_size, self.nb
        for c0 in range(0, grads.shape[0], B):
            g = grads[c0 : c0 + B].to(device=self.finv.device, dtype=torch.float64)
            c = g.shape[0]
            if nb * B != K:
                g = F.pad(g, (0, nb * B - K))
            g = g.view(c, R, nb, B).permute(1, 2, 0, 3)  # (R, nb, c, B)
            rows = max(1, _CHUNK_ELEMS // max(1, nb * B * (B + c)))
            eye_c = torch.eye(c, dtype=torch.float64, device=g.device) * self.num_grads
            for r0 in range(0, R, rows):
                fi = self.finv[r0 : r0 + rows].to(torch.float64)
                gg = g[r0 : r0 + rows]
                A = fi @ gg.transpose(-1, -2)  # (r, nb, B, c) = F^-1 G^T
                S = eye_c + gg @ A  # (r, nb, c, c)
                fi = fi - A @ torch.linalg.solve(S, A.transpose(-1, -2))
                fi = 0.5 * (fi + fi.transpose(-1, -2))
                self.finv[r0 : r0 + rows] = fi.to(self.finv.dtype)
            self.count += c

    def group_blocks(self, m: int) -> torch.Tensor:
        """The (R, G, M, M) diagonal sub-blocks of F^-1 of every row's M-groups (G = ceil(K/M))."""
        R, K = self.shape
        B = self.block_size
        if B % m:
            raise ValueError(f"Fisher block size {B} must be a multiple of M={m}")
        t = B // m
        sub = self.finv.view(R, self.nb, t, m, t, m).diagonal(dim1=2, dim2=4)  # (R, nb, M, M, t)
        sub = sub.permute(0, 1, 4, 2, 3).reshape(R, self.nb * t, m, m)
        return sub[:, : math.ceil(K / m)]


def group_hessians(finv_groups: torch.Tensor) -> torch.Tensor:
    """Effective M x M Hessians ``[(F^-1)_gg]^-1`` (float64) of groups (..., M, M)."""
    out = torch.empty(finv_groups.shape, dtype=torch.float64, device=finv_groups.device)
    flat_in, flat_out = finv_groups.reshape(-1, *finv_groups.shape[-2:]), out.view(-1, *finv_groups.shape[-2:])
    n = max(1, _CHUNK_ELEMS // finv_groups.shape[-1] ** 2)
    for s in range(0, flat_in.shape[0], n):
        a = flat_in[s : s + n].to(torch.float64)
        flat_out[s : s + n] = torch.cholesky_inverse(torch.linalg.cholesky(a))
    return out


# --------------------------------------------------------------------------------------------- saliency
@lru_cache(maxsize=None)
def _combos(m: int, k: int) -> tuple:
    return tuple(itertools.combinations(range(m), k))


def keep_sets(m: int, n: int, device=None) -> torch.Tensor:
    """All C(M, N) kept index sets of a group, (S, N) ascending, lexicographic order."""
    return torch.tensor(_combos(m, n), dtype=torch.long, device=device).view(-1, n)


def _pad_groups(weight: torch.Tensor, m: int) -> torch.Tensor:
    R, K = weight.shape
    G = math.ceil(K / m)
    return F.pad(weight, (0, G * m - K)).view(R, G, m)


def _inv_quad_form(A: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``u^T A^-1 u`` for a batch of small SPD matrices A (..., n, n): LDL^T elimination vectorised over the
    batch (n steps of elementwise ops; far faster than per-matrix LAPACK calls for millions of tiny solves)."""
    A = A.clone()
    c = u.clone()
    n = A.shape[-1]
    out = torch.zeros(u.shape[:-1], dtype=u.dtype, device=u.device)
    for k in range(n):
        piv = A[..., k, k]
        out += c[..., k] ** 2 / piv
        if k + 1 < n:
            f = A[..., k + 1 :, k] / piv[..., None]
            A[..., k + 1 :, k + 1 :] -= f[..., :, None] * A[..., k, None, k + 1 :]
            c[..., k + 1 :] -= f * c[..., k, None]
    return out


def keepset_saliency(weight: torch.Tensor, hess: torch.Tensor, n: int) -> torch.Tensor:
    """OBS cost ``rho`` (float64, (R, G, S)) of keeping each N-subset of each row's M-group, pruning the rest.

    ``hess``: effective group Hessians (R, G, M, M) (from :func:`group_hessians`) or one shared (M, M) /
    (G, M, M) Hessian (layer-wise pruning). ``rho(K) = 1/2 (w^T H w - u_K^T H_KK^-1 u_K)``, ``u = H w``.
    """
    m = hess.shape[-1]
    w = _pad_groups(weight.detach().to(torch.float64), m)  # (R, G, M)
    R, G, _ = w.shape
    ks = keep_sets(m, n, device=w.device)  # (S, N)
    S = ks.shape[0]
    H = hess.to(torch.float64)
    shared = H.dim() < 4
    if shared:  # one Hessian for all rows: invert the S kept blocks once
        Hg = H.expand(G, m, m) if H.dim() == 2 else H
        HKK_inv = torch.linalg.inv(Hg[:, ks[:, :, None], ks[:, None, :]])  # (G, S, N, N)
    out = torch.empty(R, G, S, dtype=torch.float64, device=w.device)
    rows = max(1, _CHUNK_ELEMS // max(1, G * S * n * n * 2))
    for r0 in range(0, R, rows):
        wr = w[r0 : r0 + rows]
        Hr = H if shared else H[r0 : r0 + rows]
        u = (Hr @ wr[..., None])[..., 0]  # (r, G, M)
        base = (u * wr).sum(-1)  # (r, G)
        uK = u[..., ks]  # (r, G, S, N)
        if shared:
            quad = (uK * (HKK_inv @ uK[..., None])[..., 0]).sum(-1)
        else:
            quad = _inv_quad_form(Hr[:, :, ks[:, :, None], ks[:, None, :]], uK)  # H_KK: (r, G, S, N, N)
        out[r0 : r0 + rows] = 0.5 * (base[..., None] - quad)
    return out.clamp_min_(0.0)


def element_saliency(weight: torch.Tensor, finv_diag: torch.Tensor) -> torch.Tensor:
    """Per-element OBS saliency ``w^2 / (2 [F^-1]_ii)`` (cost of pruning one weight alone)."""
    return weight.detach().double().pow(2) / (2.0 * finv_diag.double())


# --------------------------------------------------------------------------------------------- selection
def exact_search_feasible(spec: VNMSpec, width: int | None = None) -> bool:
    m = spec.m if width is None else width
    k = min(spec.kept_columns, m)
    n = min(spec.n, m)
    return math.comb(m, n) <= MAX_KEEP_SETS and math.comb(m, k) * math.comb(k, n) <= MAX_PATTERNS


@lru_cache(maxsize=None)
def _search_tables(m: int, k: int, n: int):
    """Column sets (C, k) and, per column set, the indices of its kept N-subsets in keep_sets(m, n) (C, T)."""
    ks_index = {c: i for i, c in enumerate(_combos(m, n))}
    col_sets = _combos(m, k)
    subsets = [[ks_index[tuple(s[j] for j in sub)] for sub in _combos(k, n)] for s in col_sets]
    return torch.tensor(col_sets, dtype=torch.long).view(-1, k), torch.tensor(subsets, dtype=torch.long)


def select_keepsets(cost: torch.Tensor, spec: VNMSpec, K: int | None = None) -> torch.Tensor:
    """V:N:M mask (bool (R, G*M) sliced to K) minimising the summed per-row cost of the kept N-subsets.

    ``cost``: (R, G, S) cost of keeping each of the S = C(M, N) subsets of ``keep_sets(M, N)`` (lower is
    better, e.g. OBS ``rho``). Per V x M block the C(M, k) column sets are searched exhaustively: each row
    takes its cheapest N-subset inside the set, the set with the smallest sum over the V rows wins.
    """
    R, G, S = cost.shape
    m, n, v = spec.m, spec.n, spec.v
    k = spec.kept_columns
    col_sets, subsets = _search_tables(m, k, n)
    col_sets, subsets = col_sets.to(cost.device), subsets.to(cost.device)
    C, T = subsets.shape
    rb = math.ceil(R / v)
    c = F.pad(cost.float(), (0, 0, 0, 0, 0, rb * v - R))  # padded rows cost 0 whatever they keep
    c = c.view(rb, v, G, S).permute(0, 2, 1, 3)  # (Rb, G, V, S)
    c = c.reshape(rb * G, v, S)
    best_set = torch.empty(rb * G, dtype=torch.long, device=cost.device)
    chunk = max(1, _CHUNK_ELEMS // max(1, v * C * T))
    for s0 in range(0, rb * G, chunk):
        per = c[s0 : s0 + chunk][:, :, subsets]  # (b, V, C, T)
        best_set[s0 : s0 + chunk] = per.min(-1).values.sum(1).argmin(-1)
    # each row's cheapest subset inside its block's chosen set
    row_subsets = subsets[best_set]  # (Rb*G, T)
    vals = c.gather(2, row_subsets[:, None, :].expand(-1, v, -1))  # (Rb*G, V, T)
    chosen = row_subsets[:, None, :].expand(-1, v, -1).gather(2, vals.argmin(-1, keepdim=True))[..., 0]  # (Rb*G, V)
    kept = keep_sets(m, n, device=cost.device)[chosen]  # (Rb*G, V, N)
    mask = torch.zeros(rb * G, v, m, dtype=torch.bool, device=cost.device).scatter_(-1, kept, True)
    mask = mask.view(rb, G, v, m).permute(0, 2, 1, 3).reshape(rb * v, G * m)
    return mask[:R, : (K if K is not None else G * m)].contiguous()


def obs_mask(weight: torch.Tensor, spec: VNMSpec | str, finv_groups: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """Second-order V:N:M mask of ``weight`` (R, K) from the Fisher-inverse group blocks (R, G, M, M).

    ``mode``: ``"exact"`` (keep-set saliency + exhaustive column-set search), ``"element"`` (per-element OBS
    saliency + :func:`make_mask`) or ``"auto"`` (exact where :func:`exact_search_feasible`).
    A last partial column group (K % M != 0) always uses the element path.
    """
    spec = VNMSpec.parse(spec)
    R, K = weight.shape
    m = spec.m
    full = (K // m) * m
    if mode == "auto":
        mode = "exact" if exact_search_feasible(spec) else "element"
    if mode not in ("exact", "element"):
        raise ValueError(f"unknown selection mode {mode!r}; use 'auto', 'exact' or 'element'")
    diag = finv_groups.diagonal(dim1=-2, dim2=-1).reshape(R, -1)[:, :K]
    if mode == "element" or full == 0:
        return make_mask(weight, spec, scores=element_saliency(weight, diag).float())
    G = full // m
    hess = group_hessians(finv_groups[:, :G])
    cost = keepset_saliency(weight[:, :full], hess, spec.n)
    mask = select_keepsets(cost, spec, full)
    if full < K:
        tail = make_mask(weight[:, full:], spec, scores=element_saliency(weight[:, full:], diag[:, full:]).float())
        mask = torch.cat([mask, tail], 1)
    return mask


# --------------------------------------------------------------------------------------------- update
@torch.no_grad()
def obs_update(weight: torch.Tensor, finv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """OBS-compensated weight (same shape/dtype): ``w + dw`` with ``dw = -F^-1 e_Q [(F^-1)_QQ]^-1 w_Q`` per
    Fisher block (``finv``: (R, nb, B, B)), Q = every position outside ``mask``; pruned entries are set to 0."""
    R, K = weight.shape
    nb, B = finv.shape[1], finv.shape[-1]
    w = F.pad(weight.detach().to(torch.float64), (0, nb * B - K)).view(R, nb, B)
    q = F.pad(~mask.bool(), (0, nb * B - K), value=True).view(R, nb, B)  # pruned (padding counts as pruned)
    out = torch.empty_like(w)
    rows = max(1, _CHUNK_ELEMS // max(1, nb * B * B * 3))
    for r0 in range(0, R, rows):
        fi = finv[r0 : r0 + rows].to(torch.float64)
        qq = q[r0 : r0 + rows].to(torch.float64)
        wr = w[r0 : r0 + rows]
        A = fi * qq[..., :, None] * qq[..., None, :] + torch.diag_embed(1.0 - qq)
        x = torch.linalg.solve(A, qq * wr)  # zero outside Q; [(F^-1)_QQ]^-1 w_Q on Q
        delta = -(fi @ x[..., None])[..., 0]
        out[r0 : r0 + rows] = (wr + delta) * (1.0 - qq)
    return out.view(R, nb * B)[:, :K].to(weight.dtype)
