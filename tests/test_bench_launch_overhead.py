"""bench.launch_overhead's decoder-layer mode on the CPU: the rows it reports, and that what it times is a
packed layer's fused path (one SpMM per fused group), on a tiny Llama-shaped layer."""

from __future__ import annotations

import statistics

import pytest
import torch

from venom_hf import modules as vm
from venom_hf.bench import launch_overhead as lo


def test_decoder_layer_rows_are_medians_over_rounds_with_dense_ratios():
    rows = lo.measure_decoder_layer("llama3-8b", ["64:2:8"], tokens=(1, 3), rounds=3, layers=4, device="cpu",
                                    dtype=torch.float32, tiny=True)
    assert [r["tokens"] for r in rows] == [1, 3]
    for r in rows:
        assert list(r["us_per_layer"]) == ["dense", "64:2:8"]
        for name, times in r["us_rounds"].items():
            assert len(times) == 3 and min(times) > 0
            assert r["us_per_layer"][name] == statistics.median(times)
        assert r["over_dense"]["dense"] == 1.0
        assert r["over_dense"]["64:2:8"] == pytest.approx(r["us_per_layer"]["64:2:8"] / r["us_per_layer"]["dense"])


def test_issued_projections_of_a_packed_layer_run_one_spmm_per_fused_group(monkeypatch):
    from venom_hf.bench import generate as gen

    built = {}
    apply_format = gen.apply_format
    monkeypatch.setattr(gen, "apply_format", lambda model, fmt: built.setdefault(fmt, apply_format(model, fmt)))
    lo.measure_decoder_layer("llama3-8b", ["64:2:8"], tokens=(2,), rounds=1, layers=1, device="cpu",
                             dtype=torch.float32, tiny=True)
    layer = built["64:2:8"].model.layers[0]
    calls = []
    spmm = vm.spmm
    monkeypatch.setattr(vm, "spmm", lambda *a, **k: calls.append(a[-1]) or spmm(*a, **k))  # a[-1]: output rows
    x, xo, xd = torch.randn(2, 1, 128), torch.randn(2, 1, 128), torch.randn(2, 1, 256)
    with torch.no_grad():
        lo._issue_projections(layer, x, xo, xd)
    a, mlp = layer.self_attn, layer.mlp
    assert calls == [a.q_proj.out_features + a.k_proj.out_features + a.v_proj.out_features, a.o_proj.out_features,
                     mlp.gate_proj.out_features + mlp.up_proj.out_features, mlp.down_proj.out_features]
