"""The packed layer's CPU paths (``venom_hf.spmm`` off CUDA, ``vnm_linear``, ``VNMSparseLinear``) against an
independent float64 reference: the dense weight times its mask, built from the original weight and the mask
handed to ``pack`` (never from ``unpack``), so a packing or unpacking bug cannot cancel out."""

from __future__ import annotations

import pytest
import torch

from venom_hf import format as vf
from venom_hf import spmm

# dtype -> largest error of an output element relative to its size plus its row's RMS (see max_error)
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def max_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    rms = ref.pow(2).mean(-1, keepdim=True).sqrt()
    return ((y.double() - ref).abs() / (ref.abs() + rms).clamp_min(1e-30)).max().item()


def case(R, K, spec, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(R, K, generator=g).to(dtype)
    mask = vf.make_mask(w, spec)
    x = torch.randn(2, 3, K, generator=g).to(dtype)
    b = torch.randn(R, generator=g).to(dtype)
    ref = x.double() @ (w.double() * mask.double()).T + b.double()
    return vf.pack(w, spec, mask), x, b, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("R,K,spec", [(200, 300, "64:2:8"), (64, 128, "16:2:16"), (130, 72, "128:2:4"),
                                      (33, 260, "32:2:32")])
def test_cpu_paths_match_the_masked_dense_weight(R, K, spec, dtype):
    p, x, b, ref = case(R, K, spec, dtype)
    s = vf.VNMSpec.parse(spec)
    y = spmm(x, p.values, p.columns, p.meta, b, s.v, s.m, R)
    assert y.shape == (2, 3, R) and y.dtype == dtype
    assert max_error(y, ref) < TOL[dtype]
    assert max_error(vf.vnm_linear(x, p, b), ref) < TOL[dtype]


def test_sparse_layer_matches_the_masked_dense_weight():
    from venom_hf.modules import VNMMaskedLinear, VNMSparseLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(300, 200)
    w = lin.weight.detach().clone()
    mask = vf.make_mask(w, "64:2:8")
    layer = VNMSparseLinear.from_masked(VNMMaskedLinear.from_linear(lin, "64:2:8", mask=mask))
    x = torch.randn(5, 300)
    ref = x.double() @ (w.double() * mask.double()).T + lin.bias.double()
    assert max_error(layer(x), ref) < TOL[torch.float32]


def test_the_error_measure_sees_one_wrong_row_among_many():
    """What the per-element measure is for: a relative Frobenius norm over 4096 rows hides a wrong row."""
    ref = torch.randn(4096, 64, dtype=torch.float64)
    y = ref.clone()
    y[1234] = 0.0
    assert ((y - ref).norm() / ref.norm()).item() < 2e-2  # the bf16 Frobenius tolerance passes it
    assert max_error(y, ref) > 0.4
