"""GPU: the eager launch-plan fast path of VNMSparseLinear and fused groups, and transformers' compiled
static-cache generation with CUDA graphs (mode "reduce-overhead"). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gpu_testutils import skip_module_without_spatha

import venom_hf
from venom_hf import VNMSparseLinear, fuse_projections
from venom_hf import modules as vm

pytestmark = pytest.mark.gpu

skip_module_without_spatha()

DEV = torch.device("cuda")


def _max_row_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest per-row relative error (a wholly wrong row cannot hide in a large output)."""
    d = (y.double() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)
    return float(d.max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 16, 65, 300])
@pytest.mark.parametrize("shape", [(576, 576), (1000, 264), (4096, 4096)])
def test_fast_path_equals_the_op_and_the_reference(dtype, tokens, shape):
    R, K = shape
    torch.manual_seed(tokens + R)
    layer = VNMSparseLinear.from_linear(nn.Linear(K, R, dtype=dtype, device=DEV), "64:2:8")
    wd = layer.to_dense_weight().double()
    for call in range(3):  # 1st: the op (makes the plan), then the cached plan
        x = torch.randn(2, tokens, K, dtype=dtype, device=DEV)
        torch.empty(64 << 20, dtype=torch.uint8, device=DEV).fill_(0xFF)  # poison the allocator (NaN bits)
        y = layer(x)
        via_op = venom_hf.spmm(x, layer.weight_values, layer.weight_columns, layer.weight_meta, layer.bias, 64, 8, R)
        torch.cuda.synchronize()
        assert torch.isfinite(y).all()
        assert torch.equal(y, via_op), f"call {call}"
        ref = x.double() @ wd.T + layer.bias.double()
        assert _max_row_err(y, ref) < (5e-3 if dtype == torch.float16 else 3e-2)
    assert len(layer._plans) == 1


def test_plan_follows_replaced_weights_and_ignores_strided_inputs():
    torch.manual_seed(0)
    a = VNMSparseLinear.from_linear(nn.Linear(512, 256, dtype=torch.float16, device=DEV), "64:2:8")
    b = VNMSparseLinear.from_linear(nn.Linear(512, 256, dtype=torch.float16, device=DEV), "64:2:8")
    x = torch.randn(1, 512, dtype=torch.float16, device=DEV)
    a(x)
    a(x)  # planned
    a.weight_values, a.weight_columns, a.weight_meta, a.bias = b.weight_values, b.weight_columns, b.weight_meta, b.bias
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    xs = torch.randn(512, 3, dtype=torch.float16, device=DEV)[:, :1].T  # strided (1, 512) view
    torch.testing.assert_close(a(xs), b(xs.contiguous()), rtol=0, atol=0)


def test_fast_path_captures_in_a_cuda_graph():
    torch.manual_seed(0)
    layer = VNMSparseLinear.from_linear(nn.Linear(1024, 2048, dtype=torch.float16, device=DEV), "64:2:8")
    x = torch.randn(1, 1024, dtype=torch.float16, device=DEV)
    for _ in range(3):
        layer(x)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = layer(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)


def _tiny(model_type: str, dtype=torch.bfloat16):
    import transformers

    torch.manual_seed(0)
    if model_type == "llama":
        cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=704, num_attention_heads=4,
                                       num_key_value_heads=2, num_hidden_layers=2, vocab_size=256,
                                       max_position_embeddings=256)
        cls = transformers.LlamaForCausalLM
    else:  # the Gemma-3-270M layer shapes: q|k|v 1536 rows (small: the split-K decode kernels run)
        cfg = transformers.Gemma3TextConfig(hidden_size=640, intermediate_size=2048, num_attention_heads=4,
                                            num_key_value_heads=1, head_dim=256, num_hidden_layers=2,
                                            vocab_size=512, max_position_embeddings=256, sliding_window=512,
                                            layer_types=["sliding_attention", "full_attention"])
        cls = transformers.Gemma3ForCausalLM
    with torch.device(DEV):
        model = cls(cfg).to(dtype).eval()
    venom_hf.prune(model, None, "64:2:8", method="magnitude", progress=False)
    venom_hf.compress(model, progress=False)
    fuse_projections(model)
    return model


@pytest.mark.parametrize("model_type", ["llama", "gemma3"])
def test_static_cache_generate_with_cuda_graphs_matches_eager(model_type):
    """transformers compiles the decode step (inductor, reduce-overhead: cudagraph trees) with the Spatha
    kernels inside; no tensor of ours may outlive a graph (the split-K counters live in driver memory)."""
    model = _tiny(model_type)
    ids = torch.randint(0, 256, (2, 12), device=DEV)
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model.generate(ids, **kw)
        static = model.generate(ids, cache_implementation="static", **kw)
        again = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(again.sequences, static.sequences)
    # step 1 is the first compiled decode step (step 0 is the eager prefill); bf16 logits of two paths
    agree = (static.sequences == eager.sequences).all(dim=0)
    for step in range(1, 12):
        if not agree[ids.shape[1] + step - 1]:
            break  # a near-tie resolved differently: the sequences diverge from here
        ref = eager.logits[step].double()
        err = float(((static.logits[step].double() - ref).norm(dim=-1) / ref.norm(dim=-1)).max())
        assert err < 3e-2, f"step {step}: {err}"
    assert agree.float().mean() > 0.9
    torch._dynamo.reset()


@pytest.mark.parametrize("model_type", ["llama", "gemma3"])
def test_inference_mode_generate_of_a_fused_model_on_gpu(model_type):
    """Under torch.inference_mode each fused member runs alone (inference tensors have no version counter):
    the same tokens and logits as the fused path under no_grad, whose members share one SpMM."""
    model = _tiny(model_type)
    ids = torch.randint(0, 256, (2, 9), device=DEV)
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
    with torch.inference_mode():
        out = model.generate(ids, **kw)
    # a member alone may take another kernel or split than its group (another summation order in bf16)
    agree = (out.sequences == ref.sequences).all(dim=0)
    assert agree.float().mean() > 0.9
    for step in range(8):
        if not agree[ids.shape[1] + step - 1]:
            break  # a near-tie resolved differently: the sequences diverge from here
        r = ref.logits[step].double()
        err = float(((out.logits[step].double() - r).norm(dim=-1) / r.norm(dim=-1)).max())
        assert err < 3e-2, f"step {step}: {err}"


def test_counters_are_outside_the_torch_allocator():
    from venom_hf.kernels import ops

    side = torch.cuda.Stream()
    before = torch.cuda.memory_allocated()
    addr = ops._counter_buffer(torch.cuda.current_device(), side.cuda_stream, 10)
    assert addr is not None and torch.cuda.memory_allocated() == before
    assert ops._counter_buffer(torch.cuda.current_device(), side.cuda_stream, 10) == addr  # one per stream


def test_split_k_workspace_is_per_stream_driver_memory_that_grows():
    """The decode kernels' split-K partials: one buffer per stream outside torch's allocator (so eager calls
    allocate only their output), a bigger one when a call needs more, none handed out to a new stream
    while it captures (that call takes graph-pool memory)."""
    from venom_hf.kernels import ops

    idx = torch.cuda.current_device()
    side = torch.cuda.Stream()
    before = torch.cuda.memory_allocated()
    a = ops._stream_workspace(idx, side.cuda_stream, 1000)
    assert a is not None and torch.cuda.memory_allocated() == before
    assert ops._stream_workspace(idx, side.cuda_stream, 900) == a
    size = ops._WORKSPACES[(idx, side.cuda_stream)][1]
    b = ops._stream_workspace(idx, side.cuda_stream, size + 1)
    assert b != a and ops._WORKSPACES[(idx, side.cuda_stream)][1] >= 2 * size
    assert ops._stream_workspace(idx, torch.cuda.current_stream().cuda_stream, 10) not in (a, b)
    g = torch.cuda.CUDAGraph()
    fresh = torch.cuda.Stream()
    with torch.cuda.graph(g, stream=fresh):
        assert ops._stream_workspace(idx, fresh.cuda_stream, 10) is None


def test_decode_calls_allocate_only_their_output(monkeypatch):
    """A split-K decode launch through a cached plan: one tensor from torch's allocator (the output), the
    result still that of the reference."""
    from venom_hf.kernels import ops

    if not ops.device_has_tma(torch.cuda.current_device()):
        pytest.skip("the TMA decode kernel needs sm_90+")
    monkeypatch.setenv("VENOM_HF_SPMM_CONFIG", "tma_n1r2w4")  # the H200's pick for 1-8 tokens, split-K
    torch.manual_seed(0)
    lin = nn.Linear(4096, 4096, bias=False, dtype=torch.bfloat16, device=DEV)
    layer = VNMSparseLinear.from_linear(lin, "64:2:8")
    x = torch.randn(1, 4096, dtype=torch.bfloat16, device=DEV)
    with torch.no_grad():
        layer(x), layer(x)  # plan made, then cached
        plan = next(iter(layer._plans.values()))[0]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y = layer(x)
        peak = torch.cuda.max_memory_allocated() - base
    ref = x.double() @ layer.to_dense_weight().double().T
    assert plan.split > 1  # the case with a workspace
    assert peak <= y.numel() * y.element_size() + 512  # the output, rounded up by the allocator
    assert _max_row_err(y, ref) < 1e-2
