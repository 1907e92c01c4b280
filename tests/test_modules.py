"""VNMMaskedLinear / VNMSparseLinear: masks, gradients, packing, conversions (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from venom_hf.format import VNMFormatError, VNMSpec, check_mask, make_mask, packed_shapes, unpack
from venom_hf.modules import VNMMaskedLinear, VNMSparseLinear, pack_mask_bits, unpack_mask_bits


def _linear(out_f, in_f, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias, dtype=dtype)


@pytest.mark.parametrize("shape", [(4, 8), (3, 13), (70, 45)])
def test_mask_bits_roundtrip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    bits = pack_mask_bits(mask)
    assert bits.dtype == torch.uint8 and tuple(bits.shape) == (shape[0], -(-shape[1] // 8))
    assert torch.equal(unpack_mask_bits(bits, shape[1]), mask)


@pytest.mark.parametrize("spec,shape", [("16:2:8", (64, 96)), ("8:2:16", (70, 45)), ("4:4:8", (32, 40))])
def test_masked_forward_and_grad(spec, shape):
    lin = _linear(*shape)
    w0 = lin.weight.detach().clone()
    expect_mask = make_mask(w0, spec)
    m = VNMMaskedLinear.from_linear(lin, spec)
    assert m.weight is lin.weight  # parameters are shared, not copied
    assert torch.equal(m.mask, expect_mask)
    check_mask(m.mask, spec)
    # compact storage: 1 bit per weight, non-persistent (the state dict holds the zeros-baked weight only)
    assert m.mask_bits.dtype == torch.uint8 and m.mask_bits.numel() == shape[0] * -(-shape[1] // 8)
    assert set(m.state_dict()) == {"weight", "bias"}
    assert torch.equal(m.weight.detach(), w0 * expect_mask)
    x = torch.randn(5, shape[1], requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, F.linear(x, w0 * expect_mask, lin.bias), rtol=0, atol=0)
    y.square().sum().backward()
    assert m.weight.grad is not None
    assert bool((m.weight.grad[~expect_mask] == 0).all())
    assert bool((m.weight.grad[expect_mask] != 0).any())


def test_masked_set_mask_validates_and_bakes():
    lin = _linear(32, 64)
    m = VNMMaskedLinear.from_linear(lin, "16:4:8")
    assert m.spec == VNMSpec(16, 4, 8)
    new = make_mask(m.weight.detach(), "16:2:8", scores=torch.rand(32, 64))
    m.set_mask(new, spec="16:2:8")
    assert m.spec == VNMSpec(16, 2, 8) and torch.equal(m.mask, new)
    assert bool((m.weight[~new] == 0).all())
    bad = new.clone()
    bad[0, :8] = True
    with pytest.raises(VNMFormatError, match="row 0"):
        m.set_mask(bad)
    with pytest.raises(VNMFormatError, match="shape"):
        m.set_mask(new[:, :8])


def test_masked_load_state_dict_rederives_mask():
    a = VNMMaskedLinear.from_linear(_linear(32, 64, seed=1), "16:2:8")
    b = VNMMaskedLinear.from_linear(_linear(32, 64, seed=2), "16:2:8")
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.mask, a.mask)  # derived from the loaded zeros
    x = torch.randn(3, 64)
    assert torch.equal(b(x), a(x))


def test_masked_meta_construction_and_to_linear():
    with torch.device("meta"):
        m = VNMMaskedLinear(64, 32, spec="16:2:8")
    assert m.weight.is_meta and not m.mask_ready
    lin = _linear(32, 64)
    masked = VNMMaskedLinear.from_linear(lin, "16:2:8")
    plain = masked.to_linear()
    assert type(plain) is nn.Linear and plain.weight is masked.weight
    x = torch.randn(4, 64)
    assert torch.equal(plain(x), masked(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec,shape,bias", [("16:2:8", (64, 128), True), ("64:2:8", (128, 64), False),
                                             ("8:2:16", (70, 45), True)])
def test_sparse_matches_masked(spec, shape, bias, dtype):
    lin = _linear(*shape, bias=bias, dtype=dtype)
    masked = VNMMaskedLinear.from_linear(lin, spec)
    sparse = VNMSparseLinear.from_masked(masked)
    want = packed_shapes(shape[0], shape[1], spec)
    named = dict(sparse.named_parameters())
    assert set(named) == {"weight_values", "weight_columns", "weight_meta"} | ({"bias"} if bias else set())
    for key in ("values", "columns", "meta"):
        t = named[f"weight_{key}"]
        assert tuple(t.shape) == want[key] and not t.requires_grad
    assert sparse.weight_values.dtype == dtype
    assert sparse.weight_columns.dtype == sparse.weight_meta.dtype == torch.uint8
    sparse.validate()
    assert torch.equal(unpack(sparse.packed), masked.weight.detach())
    x = torch.randn(3, 7, shape[1], dtype=dtype)
    with torch.no_grad():
        ref = masked(x)
        out = sparse(x)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    back = sparse.to_linear()
    assert type(back) is nn.Linear and torch.equal(back.weight, masked.weight.detach())
    remasked = sparse.to_masked()
    assert torch.equal(remasked.mask, masked.mask)


def test_sparse_from_linear_default_mask_and_errors():
    lin = _linear(32, 64)
    s = VNMSparseLinear.from_linear(lin, "16:2:8")
    assert torch.equal(s.to_dense_weight(), lin.weight.detach() * make_mask(lin.weight, "16:2:8"))
    with pytest.raises(VNMFormatError, match="V:2:M"):
        VNMSparseLinear(64, 32, spec="16:4:8")
    # a fresh layer holds a valid all-zero weight in the format's padding form
    fresh = VNMSparseLinear(64, 32, spec="16:2:8")
    fresh.validate()
    assert torch.equal(fresh(torch.randn(2, 64)), fresh.bias.expand(2, 32))


def test_sparse_validate_names_tensor():
    s = VNMSparseLinear.from_linear(_linear(32, 64), "16:2:8")
    with torch.no_grad():
        s.weight_columns[0, 0, 3] = 9
    with pytest.raises(VNMFormatError, match=r"blk\.weight_columns"):
        s.validate("blk.weight_")
