"""Invariants of venom_hf.format: spec parsing, mask structure, pack/unpack, validation, reference matmul."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from venom_hf.format import (
    PackedVNM,
    VNMFormatError,
    VNMSpec,
    check_mask,
    make_mask,
    mask_from_weight,
    pack,
    packed_shapes,
    unpack,
    validate,
    vnm_linear,
)



def brute_force_structure(mask: torch.Tensor, spec: VNMSpec):
    """Independent (loop-based) check of the V:N:M structure; returns None or a description."""
    R, K = mask.shape
    for r0 in range(0, R, spec.v):
        for c0 in range(0, K, spec.m):
            blk = mask[r0 : r0 + spec.v, c0 : c0 + spec.m]
            width = blk.shape[1]
            cols = blk.any(0).nonzero().flatten().tolist()
            if len(cols) > spec.kept_columns:
                return f"block ({r0},{c0}) uses {len(cols)} columns"
            for row in blk:
                if int(row.sum()) != min(spec.n, width):
                    return f"block ({r0},{c0}) row keeps {int(row.sum())}"
    return None


@st.composite
def shapes_and_specs(draw, packable=False):
    v = draw(st.sampled_from([1, 2, 4, 16, 32, 64]))
    m = draw(st.sampled_from([4, 5, 8, 10, 16, 32]))
    n = 2 if packable else draw(st.integers(1, m - 1))
    R = draw(st.integers(1, 3 * v + 5))
    K = draw(st.integers(1, 3 * m + 7))
    return R, K, VNMSpec(v, n, m)


# ------------------------------------------------------------------------------------------------- spec
def test_spec_parse_and_properties():
    s = VNMSpec.parse("64:2:8")
    assert (s.v, s.n, s.m) == (64, 2, 8)
    assert str(s) == "64:2:8" and s.sparsity == 0.75 and s.packable
    assert VNMSpec.parse((128, 2, 16)) == VNMSpec(128, 2, 16)
    assert VNMSpec.parse(s) is s
    assert VNMSpec(64, 5, 8).kept_columns == 7 and VNMSpec(64, 3, 8).kept_columns == 5
    assert VNMSpec(64, 2, 8).kept_columns == 4 and VNMSpec(64, 1, 8).kept_columns == 4
    assert VNMSpec(64, 7, 8).kept_columns == 8


@pytest.mark.parametrize(
    "bad, words",
    [
        ("64:2", "three ints"),
        ("64:x:8", "three ints"),
        ("0:2:8", "V must be >= 1"),
        ("64:8:8", "N must satisfy"),
        ("64:0:8", "N must satisfy"),
        ("64:2:3", "M must be in"),
        ("64:2:300", "M must be in"),
        (3.5, "cannot parse"),
        ((64.0, 2, 8), "must be an int"),
    ],
)
def test_spec_errors_name_the_rule(bad, words):
    with pytest.raises(VNMFormatError, match=words):
        VNMSpec.parse(bad)


# ------------------------------------------------------------------------------------------------- masks
@given(shapes_and_specs(), st.integers(0, 2**31 - 1))
def test_mask_structure_random(shape_spec, seed):
    R, K, spec = shape_spec
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(R, K, generator=g)
    mask = make_mask(w, spec)
    assert mask.shape == (R, K) and mask.dtype == torch.bool
    assert brute_force_structure(mask, spec) is None
    check_mask(mask, spec)


def test_mask_is_optimal_for_small_m():
    """For C(M, 4) within the exhaustive budget the chosen columns maximise the block saliency."""
    torch.manual_seed(0)
    spec = VNMSpec(4, 2, 8)
    w = torch.randn(4, 8)
    mask = make_mask(w, spec)
    best = max(
        sum(sorted(w[r, list(c)].abs().tolist())[-2:][0] + sorted(w[r, list(c)].abs().tolist())[-1] for r in range(4))
        for c in itertools.combinations(range(8), 4)
    )
    assert math.isclose(float((w.abs() * mask).sum()), best, rel_tol=1e-6)


def test_mask_prefers_given_scores():
    torch.manual_seed(1)
    w = torch.randn(64, 64)
    scores = torch.rand(64, 64)
    m1, m2 = make_mask(w, "64:2:8"), make_mask(w, "64:2:8", scores=scores)
    assert (scores * m2).sum() >= (scores * m1).sum()
    check_mask(m2, "64:2:8")


def test_nested_masks_with_decreasing_n():
    """Gradual schedule: with allowed=previous mask, each step's mask lies inside the previous one."""
    torch.manual_seed(2)
    w = torch.randn(128, 96)
    prev = torch.ones_like(w, dtype=torch.bool)
    for n in (7, 6, 5, 4, 3, 2):
        spec = VNMSpec(64, n, 8)
        mask = make_mask(w, spec, allowed=prev)
        check_mask(mask, spec)
        assert not bool((mask & ~prev).any()), f"mask at N={n} revived pruned weights"
        prev = mask


def test_mask_from_weight_roundtrip_and_error():
    torch.manual_seed(3)
    w = torch.randn(100, 50)
    mask = make_mask(w, "32:2:8")
    assert torch.equal(mask_from_weight(w * mask, "32:2:8"), mask)
    with pytest.raises(VNMFormatError, match="not 32:2:8-sparse"):
        mask_from_weight(w, "32:2:8")


@pytest.mark.parametrize(
    "make_bad, words",
    [
        (lambda: torch.randn(8), "must be 2-D"),
        (lambda: torch.randint(0, 3, (8, 8)), "floating"),
        (lambda: torch.tensor([[1.0, float("nan")] * 4] * 8), "non-finite"),
        (lambda: torch.tensor([[1.0, float("inf")] * 4] * 8), "non-finite"),
        (lambda: torch.empty(0, 8), "empty"),
    ],
)
def test_make_mask_bad_inputs(make_bad, words):
    with pytest.raises(VNMFormatError, match=words):
        make_mask(make_bad(), "4:2:8")


def test_check_mask_errors():
    mask = make_mask(torch.randn(8, 16), "4:2:8")
    bad = mask.clone()
    bad[0, :] = True
    with pytest.raises(VNMFormatError, match="row 0 keeps 8 entries"):
        check_mask(bad, "4:2:8")
    bad = torch.zeros(4, 8, dtype=torch.bool)
    for r in range(4):  # every row keeps 2, but the block uses 8 distinct columns
        bad[r, 2 * r : 2 * r + 2] = True
    with pytest.raises(VNMFormatError, match="distinct columns"):
        check_mask(bad, "4:2:8")
    with pytest.raises(VNMFormatError, match="torch.bool"):
        check_mask(mask.float(), "4:2:8")


# ------------------------------------------------------------------------------------------------- pack
@given(shapes_and_specs(packable=True), st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_pack_unpack_identity(shape_spec, seed, dtype):
    R, K, spec = shape_spec
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(R, K, generator=g).to(dtype)
    mask = make_mask(w, spec)
    p = pack(w, spec, mask)
    validate(p)
    for name, shp in packed_shapes(R, K, spec).items():
        assert tuple(getattr(p, name).shape) == shp
    assert p.values.dtype == dtype and p.columns.dtype == torch.uint8 and p.meta.dtype == torch.uint8
    dense = unpack(p)
    assert dense.dtype == dtype
    assert torch.equal(dense, torch.where(mask, w, torch.zeros((), dtype=dtype)))
    # packing the unpacked weight again gives identical tensors (canonical form)
    p2 = pack(dense, spec, mask)
    assert torch.equal(p2.values, p.values) and torch.equal(p2.columns, p.columns) and torch.equal(p2.meta, p.meta)


def test_pack_layout_matches_docs():
    """values[r, g, t] == W[r, g*M + columns[r // V, g, pos_t]] with pos from meta (docs/format.md)."""
    torch.manual_seed(4)
    R, K, spec = 40, 37, VNMSpec(16, 2, 8)
    w = torch.randn(R, K)
    p = pack(w, spec)
    wm = unpack(p)
    for r in range(R):
        for g in range((K + 7) // 8):
            meta = int(p.meta[r, g])
            assert meta >> 4 == 0
            for t, pos in enumerate((meta & 3, (meta >> 2) & 3)):
                col = g * 8 + int(p.columns[r // 16, g, pos])
                expect = float(wm[r, col]) if col < K else 0.0
                assert float(p.values[r, g, t]) == expect
    # padded groups and rows follow the documented padding
    gp = p.values.shape[1]
    assert gp == 8 and torch.equal(p.columns[:, 5:], torch.tensor([0, 1, 2, 3], dtype=torch.uint8).expand(3, 3, 4))
    assert bool((p.meta[:, 5:] == 0b0100).all()) and bool((p.values[R:] == 0).all())


def test_pack_rejects_bad_input():
    w = torch.randn(64, 64)
    with pytest.raises(VNMFormatError, match="only V:2:M"):
        pack(w, "64:3:8")
    with pytest.raises(VNMFormatError, match="mask shape"):
        pack(w, "64:2:8", torch.ones(64, 32, dtype=torch.bool))
    with pytest.raises(VNMFormatError, match="row 0 keeps 8"):
        pack(w, "64:2:8", torch.ones(64, 64, dtype=torch.bool))
    w[3, 5] = float("nan")
    with pytest.raises(VNMFormatError, match="non-finite"):
        pack(w, "64:2:8")


def _packed():
    torch.manual_seed(5)
    return pack(torch.randn(70, 50), "32:2:8")


@pytest.mark.parametrize(
    "corrupt, words",
    [
        (lambda p: setattr(p, "values", p.values[:-1]), "values: shape"),
        (lambda p: setattr(p, "columns", p.columns.to(torch.int32)), "columns: dtype must be torch.uint8"),
        (lambda p: p.columns.__setitem__((0, 0, 3), 8), "out of range"),
        (lambda p: p.columns.__setitem__((0, 0), torch.tensor([3, 2, 1, 0], dtype=torch.uint8)), "strictly ascending"),
        (lambda p: p.meta.__setitem__((0, 0), 0b0111), "valid 2:4 nibble"),
        (lambda p: p.meta.__setitem__((0, 0), 0b10100), "valid 2:4 nibble"),
        (lambda p: p.values.__setitem__((0, 0, 0), float("nan")), "non-finite"),
        (lambda p: p.values.__setitem__((75, 0, 0), 1.0), "padding"),
        (lambda p: p.values.__setitem__((0, 7, 1), 1.0), "padding"),
        (lambda p: setattr(p, "meta", p.meta.float()), "meta: dtype"),
    ],
)
def test_validate_names_the_corrupt_tensor(corrupt, words):
    p = _packed()
    validate(p)
    corrupt(p)
    with pytest.raises(VNMFormatError, match=words):
        validate(p)


# ------------------------------------------------------------------------------------------------- reference
@given(shapes_and_specs(packable=True), st.integers(0, 2**31 - 1), st.integers(1, 9), st.booleans())
def test_reference_exact_in_float64(shape_spec, seed, tokens, with_bias):
    R, K, spec = shape_spec
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(R, K, generator=g, dtype=torch.float64)
    x = torch.randn(2, tokens, K, generator=g, dtype=torch.float64)
    b = torch.randn(R, generator=g, dtype=torch.float64) if with_bias else None
    mask = make_mask(w, spec)
    y = vnm_linear(x, pack(w, spec, mask), b)
    assert y.shape == (2, tokens, R)
    assert torch.equal(y, F.linear(x, w * mask, b))


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_reference_low_precision_within_tolerance(dtype, tol):
    torch.manual_seed(6)
    w = torch.randn(192, 576, dtype=torch.float64) / 24
    x = torch.randn(33, 576, dtype=torch.float64)
    mask = make_mask(w, "64:2:8")
    p = pack(w.to(dtype), "64:2:8", mask)
    y = vnm_linear(x.to(dtype), p).double()
    ref = F.linear(x, w * mask)
    assert (y - ref).norm() / ref.norm() < tol


def test_reference_bad_inputs():
    p = _packed()
    with pytest.raises(VNMFormatError, match="expects 50"):
        vnm_linear(torch.randn(3, 49), p)
    with pytest.raises(VNMFormatError, match=r"bias must have shape \(70,\)"):
        vnm_linear(torch.randn(3, 50), p, torch.randn(69))


def test_packed_to_and_sizes():
    p = _packed()
    q = p.to(torch.float16)
    assert isinstance(q, PackedVNM) and q.dtype == torch.float16 and q.columns.dtype == torch.uint8
    dense_bytes = 70 * 50 * 2
    assert q.nbytes() < dense_bytes
