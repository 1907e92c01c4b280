"""Bad inputs to every entry point raise errors that name the layer and the numbers, the same on the CPU
and on CUDA (the CUDA cases are marked gpu and skip without one)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import venom_hf
from venom_hf import VNMMaskedLinear, VNMSparseLinear, fuse_projections

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


def _layers(device, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(130, 70, dtype=dtype, device=device)
    sparse = VNMSparseLinear.from_linear(lin, "16:2:8")
    masked = VNMMaskedLinear.from_linear(nn.Linear(130, 70, dtype=dtype, device=device), "16:2:8")
    return sparse, masked


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width", [129, 136])  # one short; the packed (padded) width
def test_wrong_width_raises_naming_the_numbers(device, width):
    dtype = torch.float16 if device == "cuda" else torch.float32
    sparse, masked = _layers(device, dtype)
    x = torch.randn(3, width, dtype=dtype, device=device)
    for layer, cls in ((sparse, "VNMSparseLinear"), (masked, "VNMMaskedLinear")):
        with pytest.raises(ValueError, match=rf"{cls}.*last dimension is {width}.*in_features=130"):
            layer(x)


@pytest.mark.parametrize("device", DEVICES)
def test_integer_and_mismatched_dtypes_raise(device):
    dtype = torch.float16 if device == "cuda" else torch.float32
    sparse, masked = _layers(device, dtype)
    with pytest.raises(TypeError, match="torch.int64.*floating-point"):
        sparse(torch.ones(3, 130, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="torch.int64.*floating-point"):
        masked(torch.ones(3, 130, dtype=torch.long, device=device))
    other = torch.float64 if dtype != torch.float64 else torch.float32
    with pytest.raises(TypeError, match=f"dtype {other}, the weight {dtype}"):
        sparse(torch.randn(3, 130, dtype=other, device=device))
    # what nn.Linear accepts, we accept: the right input gives nn.Linear's result on the masked weight
    x = torch.randn(2, 5, 130, dtype=dtype, device=device)
    ref = nn.functional.linear(x.double(), sparse.to_dense_weight().double(), sparse.bias.double())
    torch.testing.assert_close(sparse(x).double(), ref, rtol=1e-2 if device == "cuda" else 1e-5, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_input_on_another_device_raises():
    sparse, masked = _layers("cuda", torch.float16)
    x = torch.randn(3, 130, dtype=torch.float16)
    with pytest.raises(ValueError, match="input is on cpu, the weight on cuda"):
        sparse(x)
    with pytest.raises(ValueError, match="input is on cpu, the weight on cuda"):
        masked(x)


def test_spmm_checks_width_dtype_and_in_features():
    sparse, _ = _layers("cpu", torch.float32)
    args = (sparse.weight_values, sparse.weight_columns, sparse.weight_meta, None, 16, 8, 70)
    # the packed width holds 130 input features in 24 groups of 8: 129..192 fit, 128 does not
    with pytest.raises(ValueError, match="last dimension is 128.*129 to 192"):
        venom_hf.spmm(torch.randn(2, 128), *args)
    with pytest.raises(ValueError, match="last dimension is 131.*in_features=130"):
        venom_hf.spmm(torch.randn(2, 131), *args, in_features=130)
    with pytest.raises(TypeError, match="floating-point"):
        venom_hf.spmm(torch.ones(2, 130, dtype=torch.int32), *args)
    with pytest.raises(TypeError, match="dtype torch.float16, the weight torch.float32"):
        venom_hf.spmm(torch.randn(2, 130).half(), *args)
    y = venom_hf.spmm(torch.randn(2, 130), *args, in_features=130)
    assert y.shape == (2, 70)


def test_fused_group_member_checks_its_input():
    torch.manual_seed(0)
    parent = nn.Module()
    parent.q_proj = VNMSparseLinear.from_linear(nn.Linear(96, 64), "16:2:8")
    parent.k_proj = VNMSparseLinear.from_linear(nn.Linear(96, 32), "16:2:8")
    parent.v_proj = VNMSparseLinear.from_linear(nn.Linear(96, 32), "16:2:8")
    assert fuse_projections(parent) == 1
    parent.q_proj._vnm_name = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match=r"VNMSparseLinear\(model.layers.0.self_attn.q_proj\).*is 95"):
        parent.q_proj(torch.randn(4, 95))
    with pytest.raises(TypeError, match="torch.int64"):
        parent.k_proj(torch.ones(4, 96, dtype=torch.long))


def test_autocast_input_runs_in_the_weight_dtype():
    sparse, _ = _layers("cpu", torch.bfloat16)
    x = torch.randn(3, 130)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, sparse(x.bfloat16()))
