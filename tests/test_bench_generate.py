"""CPU tests of ``python -m venom_hf.bench.generate``: a tiny end-to-end run whose sparse tokens are checked
against a dense model holding the same (unpacked) sparse weights, and the profile arithmetic on intervals
with a known answer."""

import json
import os

import pytest
import torch
import torch.nn as nn

import venom_hf
from venom_hf.bench import generate as bench

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------- profile splitting
def test_interval_union_counts_overlaps_once():
    assert bench.interval_union([]) == 0
    assert bench.interval_union([(0, 1), (0.5, 2), (3, 4), (3.5, 3.6), (5, 5)]) == pytest.approx(3.0)
    assert bench.interval_union([(2, 3), (0, 10)]) == pytest.approx(10.0)  # unsorted, nested


def test_split_gpu_time_known_partition():
    kernels = [
        ("nvjet_tst_128x64_64x8_bf16_gemm", 0.0, 2.0),  # projection
        ("triton_red_fused_rms_norm_0", 1.5, 3.0),  # other, overlaps the GEMM by 0.5
        ("void spatha_spmm_stream<64, 8>(SpmmParams)", 2.5, 4.0),  # projection, overlaps the norm
        ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", 5.0, 6.0),  # attention despite "cutlass": other
        ("Memcpy DtoD (Device -> Device)", 6.0, 6.5),  # other
        ("sm90_xmma_gemm_bf16bf16_bf16f32", 8.0, 9.0),  # projection (lm_head GEMMs look the same)
        ("internal::gemvx::kernel<bf16>", 8.5, 9.5),  # projection, overlapping the previous one
    ]
    s = bench.split_gpu_time(kernels, wall=10.0)
    # projection: [0,2] + [2.5,4] + [8,9.5] = 5; busy: [0,4] + [5,6.5] + [8,9.5] = 7
    assert s["projection"] == pytest.approx(5.0)
    assert s["busy"] == pytest.approx(7.0)
    assert s["other"] == pytest.approx(2.0)
    assert s["idle"] == pytest.approx(3.0)
    assert s["projection"] + s["other"] + s["idle"] == pytest.approx(s["wall"])
    assert s["kernels"] == len(kernels)


@pytest.mark.parametrize("name,proj", [
    ("void spatha_spmm_ring<1, 1>(SpmmParams)", True),
    ("spatha_splitk_reduce", True),
    ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x3_tn", True),
    ("nvjet_hsh_64x8_64x16_4x1_v_bz_splitK_TNT", True),
    ("void cusparselt::sm90_sparse_gemm<bf16>", True),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>", False),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma", False),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", False),
    ("triton_poi_fused_add_cat_mul_silu_3", False),
])
def test_projection_kernel_names(name, proj):
    assert bench.is_projection_kernel(name) is proj


def test_amdahl_bounds():
    b = bench.amdahl_bounds({"projection_ms": 6.0, "other_ms": 3.0, "idle_ms": 1.0}, byte_ratio=0.25)
    assert b["projection_share"] == pytest.approx(0.6)
    assert b["bound_projection_zero"] == pytest.approx(10 / 4)
    assert b["bound_by_bytes"] == pytest.approx(10 / 5.5)


def test_profile_decode_runs_on_cpu_events():
    """The profile path end to end with CPU activities (no GPU kernels: everything is idle, nothing breaks)."""
    from torch.profiler import ProfilerActivity

    model = bench.build_model("smollm2-135m", True, CPU, torch.float32)
    prompt = bench.make_prompt(model.config.vocab_size, 1, 8, 0, CPU)
    cache = bench.new_static_cache(model, 8 + 4)
    bench.greedy(model, prompt, 2, cache)
    p = bench.profile_decode(model, cache, prompt, 2, 4, activities=[ProfilerActivity.CPU])
    st = p["per_step_ms"]
    assert set(st) == {"wall_ms", "projection_ms", "other_ms", "idle_ms", "busy_ms", "kernels_per_step"}
    assert st["projection_ms"] == st["other_ms"] == st["kernels_per_step"] == 0


def test_host_profile_counts_calls_per_step():
    """The host split by the difference of two generation lengths: a function that runs once per decoding
    step counts 1 call per step, and the two top lists are ordered by their time (call counts are exact;
    times are not asserted, a loaded CI machine can make the shorter run the slower one)."""
    model = bench.build_model("smollm2-135m", True, CPU, torch.float32)
    prompt = bench.make_prompt(model.config.vocab_size, 1, 8, 0, CPU)
    cache = bench.new_static_cache(model, 8 + 6)
    bench.greedy(model, prompt, 2, cache)
    h = bench.host_profile_decode(model, cache, prompt, 2, 6, top=10_000)
    rows = {r["function"]: r for r in h["top_cumulative"]}
    per_step = rows["transformers/generation/utils.py:_update_model_kwargs_for_generation"]
    assert per_step["calls_per_step"] == 1.0
    assert h["python_calls_per_step"] > 100 and "profiled_step_ms" in h
    selfs = [r["self_ms"] for r in h["top_self"]]
    cums = [r["cumulative_ms"] for r in h["top_cumulative"]]
    assert selfs == sorted(selfs, reverse=True) and cums == sorted(cums, reverse=True)
    assert h["top_self"][0]["self_ms"] == max(r["self_ms"] for r in h["top_cumulative"])


def test_function_label_is_package_relative():
    assert bench._function_label(("/x/lib/python3.11/site-packages/torch/nn/modules/module.py", 1, "_call_impl")) \
        == "torch/nn/modules/module.py:_call_impl"
    assert bench._function_label(("/work/repo/src/venom_hf/modules.py", 3, "forward")) == "venom_hf/modules.py:forward"
    assert bench._function_label(("~", 0, "<method 'item' of 'torch._C.TensorBase' objects>")) \
        == "<method 'item' of 'torch._C.TensorBase' objects>"


# ---------------------------------------------------------------------------------------- weight bytes
def test_weight_bytes_counts_tied_and_packed_storage_once():
    model = bench.build_model("smollm2-135m", True, CPU, torch.float32)  # tied embeddings
    wb = bench.weight_bytes(model)
    dense_proj = sum(model.get_submodule(n).weight.numel() * 4 for n in bench.projection_names(model))
    assert wb["projections"] == dense_proj
    assert wb["lm_head"] == model.config.vocab_size * model.config.hidden_size * 4
    assert wb["total"] == sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    bench.apply_format(model, "64:2:8")
    packed = [m for m in model.modules() if isinstance(m, venom_hf.VNMSparseLinear)]
    assert len(packed) == len(bench.projection_names(model)) == 14
    wb2 = bench.weight_bytes(model)
    # the fused groups' views of one concatenation are each counted once, as their own tensors
    own = sum(t.numel() * t.element_size() for m in packed for t in [*m.parameters(), *m.buffers()])
    assert wb2["projections"] == own
    assert wb2["projections"] < 0.4 * dense_proj


# -------------------------------------------------------------------------------------- the whole run
def _dense_reference(model: nn.Module) -> nn.Module:
    """The packed layers as plain nn.Linear holding their unpacked (zeros-baked) sparse weights."""
    venom_hf.unfuse_projections(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, venom_hf.VNMSparseLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, mod.to_linear())
    assert not any(isinstance(m, venom_hf.VNMSparseLinear) for m in model.modules())
    return model


def test_tiny_run_writes_results_and_sparse_tokens_match_masked_dense(tmp_path):
    out = str(tmp_path)
    bench.main(["--tiny", "--models", "smollm2-135m", "--formats", "dense", "64:2:8", "--modes", "prefill",
                "eager", "--batches", "1", "--new-tokens", "2", "4", "--prefill", "1x16", "--out", out])
    with open(os.path.join(out, "generate_cpu.json")) as f:
        res = json.load(f)
    for k in ("card", "torch", "transformers", "venom_hf", "dtype", "settings", "models", "elapsed_s"):
        assert k in res, k
    assert res["card"] == "cpu" and res["dtype"] == "float32"
    formats = res["models"]["smollm2-135m"]["formats"]
    assert list(formats) == ["dense", "64:2:8"]
    for fmt, f in formats.items():
        assert "error" not in f, f
        pre = f["prefill"]["1x16"]
        assert pre["ms"] > 0 and len(pre["times_ms"]) == 3 and all(t > 0 for t in pre["times_ms"])
        dec = f["eager"]["b1"]
        assert "error" not in dec, dec
        assert len(dec["t_L1_s"]) == len(dec["t_L2_s"]) == 3
        assert all(t > 0 for t in dec["t_L1_s"] + dec["t_L2_s"])
        # tokens/s comes from the time difference of the two lengths; on a busy CPU it can be noise only
        assert dec["tok_s"] is None or dec["tok_s"] > 0
        assert len(dec["tokens"]) == 1 and len(dec["tokens"][0]) == 4
        assert f["weight_bytes"]["total"] > 0
    assert formats["64:2:8"]["layers"] == {"VNMSparseLinear": 14}
    assert formats["64:2:8"]["weight_bytes"]["projections"] < formats["dense"]["weight_bytes"]["projections"]

    with open(os.path.join(out, "generate_cpu.md")) as f:
        md = f.read()
    assert "| format | prefill 1x16 ms | eager b1 tok/s | peak memory | weights (projections) |" in md
    assert "| 64:2:8 | " in md
    assert os.path.getsize(os.path.join(out, "generate_cpu.png")) > 0

    # the packed model's greedy tokens == those of a dense model with the same sparse weights
    ref = bench.build_model("smollm2-135m", True, CPU, torch.float32, seed=res["settings"]["seed"])
    bench.apply_format(ref, "64:2:8")
    ref = _dense_reference(ref)
    prompt = bench.make_prompt(ref.config.vocab_size, 1, res["settings"]["prompt_len"], res["settings"]["seed"], CPU)
    with torch.no_grad():
        tokens = bench.greedy(ref, prompt, 4)[:, prompt.shape[1]:].tolist()
    assert tokens == formats["64:2:8"]["eager"]["b1"]["tokens"]


def test_rounds_alternate_over_formats(tmp_path, capsys, monkeypatch):
    """Interleaved cells: every format gets one timed repeat per round, rounds in alternating format order,
    merged into one result per cell (static cells last, each format's static cache made once and reused by
    its rounds); --sequential keeps the per-format order and the same result fields."""
    made = []
    new_cache = bench.new_static_cache
    monkeypatch.setattr(bench, "new_static_cache", lambda *a: made.append(new_cache(*a)) or made[-1])
    args = ["--tiny", "--models", "smollm2-135m", "--formats", "dense", "64:2:16", "--modes", "prefill", "eager",
            "static", "--batches", "2", "--new-tokens", "1", "2", "--prefill", "1x8", "--repeats", "3"]
    res = bench.main(args + ["--out", str(tmp_path / "a")])
    log = [ln.split("] ")[1] for ln in capsys.readouterr().err.splitlines() if "(round" in ln]
    for mode in ("eager", "static"):
        assert [ln for ln in log if f" {mode} b2 " in ln] == [
            f"smollm2-135m dense {mode} b2 (round 1)", f"smollm2-135m 64:2:16 {mode} b2 (round 1)",
            f"smollm2-135m 64:2:16 {mode} b2 (round 2)", f"smollm2-135m dense {mode} b2 (round 2)",
            f"smollm2-135m dense {mode} b2 (round 3)", f"smollm2-135m 64:2:16 {mode} b2 (round 3)"]
    assert max(i for i, ln in enumerate(log) if " eager " in ln) < min(i for i, ln in enumerate(log) if " static " in ln)
    assert len(made) == 2  # one static cache per format, not one per round
    seq = bench.main(args + ["--sequential", "--out", str(tmp_path / "b")])
    assert not any("(round" in ln for ln in capsys.readouterr().err.splitlines())
    for r in (res, seq):
        for fmt, f in r["models"]["smollm2-135m"]["formats"].items():
            pre = f["prefill"]["1x8"]
            assert len(pre["times_ms"]) == 3 and pre["ms"] == sorted(pre["times_ms"])[1]
            for mode in ("eager", "static"):
                dec = f[mode]["b2"]
                assert len(dec["t_L1_s"]) == len(dec["t_L2_s"]) == 3
                t1, t2 = sorted(dec["t_L1_s"])[1], sorted(dec["t_L2_s"])[1]
                assert dec["step_ms"] == (pytest.approx((t2 - t1) * 1e3) if t2 > t1 else None)
                assert len(dec["tokens"]) == 2 and len(dec["tokens"][0]) == 2
            assert f["static"]["b2"]["recompiles"] == 0
    # the same weights and prompts: the same greedy tokens either way, and static cache = dynamic cache
    for fmt in ("dense", "64:2:16"):
        tokens = res["models"]["smollm2-135m"]["formats"][fmt]["eager"]["b2"]["tokens"]
        assert tokens == seq["models"]["smollm2-135m"]["formats"][fmt]["eager"]["b2"]["tokens"]
        assert tokens == res["models"]["smollm2-135m"]["formats"][fmt]["static"]["b2"]["tokens"]
    for mode in ("eager", "static"):
        assert res["models"]["smollm2-135m"]["formats"]["dense"][mode]["b2"]["rounds"] == 3


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_decode_warm_up_covers_the_longer_length(mode, monkeypatch):
    """The warm-up call generates L2 tokens, so that no sequence length of the timed runs is new to the
    process when it is timed; then one L1 and one L2 run per repeat."""
    lengths = []
    real = bench.greedy
    monkeypatch.setattr(bench, "greedy", lambda model, prompt, n, cache=None: lengths.append(n) or
                        real(model, prompt, n, cache))
    model = bench.build_model("smollm2-135m", True, CPU, torch.float32)
    r = bench.time_decode(model, mode, 1, 4, 2, 5, 2, 0)
    assert lengths == [5, 2, 5, 2, 5]
    assert len(r["t_L1_s"]) == len(r["t_L2_s"]) == 2 and len(r["tokens"][0]) == 5


def test_static_mode_and_budget_skip(tmp_path):
    out = str(tmp_path)
    res = bench.main(["--tiny", "--models", "gemma3-270m", "--formats", "dense", "2:4", "--modes", "static",
                      "--batches", "2", "--new-tokens", "2", "3", "--prompt-len", "20", "--repeats", "1",
                      "--out", out])
    f = res["models"]["gemma3-270m"]["formats"]
    run = f["dense"]["static"]["b2"]
    assert "error" not in run, run
    assert len(run["tokens"]) == 2 and len(run["tokens"][0]) == 3  # sliding window 16 < prompt + 3: wraps
    assert f["2:4"]["skipped"].startswith("2:4 runs on cuSPARSELt")
    # a spent budget skips the work but still writes the files
    res = bench.main(["--tiny", "--models", "smollm2-135m", "--formats", "dense", "--modes", "prefill",
                      "--prefill", "1x8", "--budget-s", "1e-9", "--out", out])
    assert res["models"]["smollm2-135m"]["formats"]["dense"] == {"skipped": "budget"}
    assert os.path.exists(os.path.join(out, "generate_cpu.md"))


def test_markdown_and_plot_of_a_gpu_shaped_result(tmp_path):
    """The tables, the profile table and the Amdahl lines from a hand-made result with known numbers."""
    gib = 2**30
    settings = {"models": ["llama3-8b"], "formats": ["dense", "64:2:8", "2:4"], "modes": ["prefill", "static"],
                "batches": [1], "new_tokens": [8, 40], "prompt_len": 32, "prefill": ["1x2048"], "repeats": 3,
                "tiny": False}
    step = {"wall_ms": 10.0, "projection_ms": 6.0, "other_ms": 3.0, "idle_ms": 1.0, "busy_ms": 9.0,
            "kernels_per_step": 500}
    formats = {
        "dense": {"weight_bytes": {"total": 16 * gib, "projections": 13 * gib, "lm_head": 1 * gib},
                  "prefill": {"1x2048": {"ms": 60.0, "peak_mem_bytes": 18 * gib}},
                  "static": {"b1": {"tok_s": 100.0, "compiled": True, "recompiles": 0}},
                  "profile": {"per_step_ms": step, "unprofiled_step_ms": 9.5,
                              "host": {"profiled_step_ms": 12.0, "python_calls_per_step": 4321.0, "top_cumulative": [],
                                       "top_self": [{"function": "torch/_dynamo/eval_frame.py:_fn",
                                                     "calls_per_step": 1.0, "self_ms": 3.0,
                                                     "cumulative_ms": 9.0}]}}},
        "64:2:8": {"weight_bytes": {"total": 6 * gib, "projections": 3 * gib, "lm_head": 1 * gib},
                   "prefill": {"1x2048": {"ms": 80.0}},
                   "static": {"b1": {"tok_s": 150.0, "compiled": True, "recompiles": 2}}},
        "2:4": {"weight_bytes": {"total": 10 * gib, "projections": 7 * gib, "lm_head": 1 * gib},
                "prefill": {"1x2048": {"error": "RuntimeError: boom"}},
                "static": {"b1": {"skipped": "budget"}}},
    }
    res = {"card": "NVIDIA H200", "card_slug": "nvidia_h200", "device": "cuda", "torch": "2.11", "transformers": "5.17",
           "venom_hf": "0.1.0", "dtype": "bfloat16", "settings": settings,
           "models": {"llama3-8b": {"shape": "32 layers", "formats": formats}}}
    bench._amdahl(res["models"]["llama3-8b"])
    am = res["models"]["llama3-8b"]["amdahl"]
    assert am["bound_projection_zero"] == pytest.approx(2.5)
    b = am["formats"]["64:2:8"]
    assert b["byte_ratio"] == pytest.approx(4 / 14)
    assert b["bound_by_bytes"] == pytest.approx(10 / (4 + 6 * 4 / 14))
    assert b["measured_static"] == pytest.approx(1.5) and am["batch"] == 1
    md = bench.markdown(res)
    assert "| 64:2:8 | 80.0 (0.75x) | 150 (1.50x) | - | 6.00 GiB (3.00 GiB) |" in md
    assert "| 2:4 | error | skipped |" in md and "- 2:4 prefill 1x2048: RuntimeError: boom" in md
    assert "- 64:2:8 static b1: 2 dynamo recompiles after warm-up" in md
    assert "| dense | 10.000 (9.500) | 6.000 (60%) | 3.000 (30%) | 1.000 (10%) | 500 |" in md
    assert "projection time -> 0 gives at most 2.50x dense" in md
    assert "one static-cache decode step, batch 1 (torch.profiler)" in md
    assert "bound 1.75x; measured static b1 1.50x (86% of the bound)" in md
    assert "dense: profiled step 12.00 ms, 4,321 Python calls per step" in md
    assert "| `torch/_dynamo/eval_frame.py:_fn` | 1 | 3.000 | 25% |" in md
    # a profile at batch 8 (--profile-batch 8): the Amdahl line compares the static b8 ratio
    formats["dense"]["profile"]["batch"] = 8
    formats["dense"]["static"]["b8"] = {"tok_s": 400.0}
    formats["64:2:8"]["static"]["b8"] = {"tok_s": 500.0}
    bench._amdahl(res["models"]["llama3-8b"])
    md = bench.markdown(res)
    assert "one static-cache decode step, batch 8 (torch.profiler)" in md
    assert "measured static b8 1.25x" in md
    bench.plot(res, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0


def test_a_failing_cell_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    real = bench.time_prefill

    def flaky(model, batch, seq, repeats, seed):
        if any(isinstance(m, venom_hf.VNMSparseLinear) for m in model.modules()):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(model, batch, seq, repeats, seed)

    monkeypatch.setattr(bench, "time_prefill", flaky)
    res = bench.main(["--tiny", "--models", "smollm2-135m", "--formats", "64:2:8", "dense", "--modes", "prefill",
                      "--prefill", "1x8", "--repeats", "1", "--out", str(tmp_path)])
    f = res["models"]["smollm2-135m"]["formats"]
    err = f["64:2:8"]["prefill"]["1x8"]
    assert err["error"] == "RuntimeError: CUDA out of memory (simulated)" and "in flaky" in err["where"]
    assert f["dense"]["prefill"]["1x8"]["ms"] > 0
    with open(tmp_path / "generate_cpu.json") as fh:
        assert json.load(fh)["models"]["smollm2-135m"]["formats"]["64:2:8"]["prefill"]["1x8"]["error"]
