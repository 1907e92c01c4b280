"""OBS machinery against brute-force references (explicit inverses / enumeration) on small blocks."""

import itertools

import pytest
import torch

from venom_hf.format import VNMSpec, check_mask
from venom_hf.pruning import (
    EmpiricalBlockFisherInverse,
    keepset_saliency,
    obs_mask,
    obs_update,
    prune_layer_obs,
    select_keepsets,
)
from venom_hf.pruning.scores import group_hessians, keep_sets


def _fisher(R, K, B, n=12, damp=1e-2, seed=0, chunks=(5,)):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(n, R, K, generator=g, dtype=torch.float64)
    f = EmpiricalBlockFisherInverse((R, K), B, damp=damp, num_grads=n, dtype=torch.float64)
    s = 0
    for c in chunks:
        f.update(grads[s : s + c])
        s += c
    f.update(grads[s:])
    return f, grads


@pytest.mark.parametrize("B,K,chunks", [(8, 16, (1, 1, 3)), (16, 16, (5,)), (8, 20, (12,))])
def test_fisher_woodbury_equals_explicit_inverse(B, K, chunks):
    R, n, damp = 3, 12, 1e-2
    f, grads = _fisher(R, K, B, n, damp, chunks=chunks)
    Kp = f.nb * B
    gp = torch.nn.functional.pad(grads, (0, Kp - K))
    for r in range(R):
        for b in range(f.nb):
            g = gp[:, r, b * B : (b + 1) * B]
            ref = torch.linalg.inv(damp * torch.eye(B, dtype=torch.float64) + g.T @ g / n)
            torch.testing.assert_close(f.finv[r, b], ref, rtol=1e-8, atol=1e-8)
    assert f.count == n
    assert f.memory_bytes() == R * f.nb * B * B * 8


def test_keepset_saliency_equals_obs_formula():
    f, _ = _fisher(4, 16, 16)
    w = torch.randn(4, 16, dtype=torch.float64)
    sub = f.group_blocks(8)  # (R, 2, 8, 8)
    cost = keepset_saliency(w, group_hessians(sub), 2)
    ks = keep_sets(8, 2)
    for r in range(4):
        for gi in range(2):
            Fi, wr = sub[r, gi], w[r, gi * 8 : (gi + 1) * 8]
            for s, keep in enumerate(ks.tolist()):
                Q = [i for i in range(8) if i not in keep]
                ref = 0.5 * wr[Q] @ torch.linalg.inv(Fi[Q][:, Q]) @ wr[Q]
                torch.testing.assert_close(cost[r, gi, s], ref, rtol=1e-7, atol=1e-9)


def test_exact_selection_is_the_brute_force_optimum():
    R, K, V = 8, 16, 4
    spec = VNMSpec(V, 2, 8)
    f, _ = _fisher(R, K, 8, seed=1)
    w = torch.randn(R, K, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mask = obs_mask(w, spec, f.group_blocks(8), "exact")
    check_mask(mask, spec)

    def rho(r, g, keep):
        Fi, wr = f.finv[r, g], w[r, g * 8 : (g + 1) * 8]
        Q = [i for i in range(8) if i not in keep]
        return float(0.5 * wr[Q] @ torch.linalg.solve(Fi[Q][:, Q], wr[Q]))

    for rb in range(R // V):
        for g in range(K // 8):
            rows = range(rb * V, rb * V + V)
            best = min(
                sum(min(rho(r, g, k) for k in itertools.combinations(cs, 2)) for r in rows)
                for cs in itertools.combinations(range(8), 4)
            )
            got = sum(rho(r, g, mask[r, g * 8 : (g + 1) * 8].nonzero().flatten().tolist()) for r in rows)
            assert got == pytest.approx(best, rel=1e-9)


def test_obs_update_equals_explicit_solve():
    spec = VNMSpec(2, 2, 8)
    f, _ = _fisher(4, 16, 8)
    w = torch.randn(4, 16, dtype=torch.float64)
    mask = obs_mask(w, spec, f.group_blocks(8))
    new = obs_update(w, f.finv, mask)
    assert (new[~mask] == 0).all()
    for r in range(4):
        for b in range(2):
            Fi, wr = f.finv[r, b], w[r, b * 8 : (b + 1) * 8]
            Q = (~mask[r, b * 8 : (b + 1) * 8]).nonzero().flatten()
            ref = wr - Fi[:, Q] @ torch.linalg.solve(Fi[Q][:, Q], wr[Q])
            ref[Q] = 0
            torch.testing.assert_close(new[r, b * 8 : (b + 1) * 8], ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("spec,shape,mode", [("4:2:8", (10, 21), "auto"), ("4:3:8", (8, 16), "exact"),
                                             ("4:5:8", (8, 16), "auto"), ("2:2:16", (4, 32), "auto"),
                                             ("2:9:16", (4, 32), "auto"), ("1:2:4", (5, 12), "element")])
def test_masks_valid_for_any_spec(spec, shape, mode):
    R, K = shape
    spec = VNMSpec.parse(spec)
    f = EmpiricalBlockFisherInverse(shape, spec.m, 1e-7, 4)
    f.update(torch.randn(4, R, K) * 1e-3)
    w = torch.randn(R, K)
    mask = obs_mask(w, spec, f.group_blocks(spec.m), mode)
    check_mask(mask, spec)


def test_select_keepsets_prefers_cheapest_pairs():
    spec = VNMSpec(2, 2, 8)
    cost = torch.ones(2, 1, 28)
    cost[:, :, 5] = 0  # keep_sets(8, 2)[5] == (0, 6)
    mask = select_keepsets(cost, spec)
    assert mask[:, [0, 6]].all() and mask.sum() == 4


def test_layerwise_obs_beats_magnitude_on_reconstruction():
    torch.manual_seed(0)
    R, K, n = 16, 32, 256
    X = torch.randn(n, K) @ torch.randn(K, K) * 0.5  # correlated inputs
    W = torch.randn(R, K)
    spec = VNMSpec(8, 2, 8)
    new, mask = prune_layer_obs(W, X.T @ X, spec, damp=0.01, block_size=16)
    check_mask(mask, spec)
    assert (new[~mask] == 0).all()
    from venom_hf.format import make_mask

    mag = W * make_mask(W, spec)
    err_obs = ((X @ (new - W).T) ** 2).sum()
    err_mag = ((X @ (mag - W).T) ** 2).sum()
    assert err_obs < 0.8 * err_mag
