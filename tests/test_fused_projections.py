"""fuse_projections: sibling VNMSparseLinear layers (q/k/v, gate/up) run as one SpMM.

CPU tests in float64 against the unfused model; the GPU part (fp16 kernel, CUDA graph) is marked and
skipped without CUDA.
"""

from __future__ import annotations

import logging
import tempfile

import pytest
import torch
import torch.nn as nn

import venom_hf
from venom_hf import modules as vm
from venom_hf.modules import VNMSparseLinear, fuse_projections, unfuse_projections


def _tiny_llama(dtype=torch.float64, spec="64:2:8", seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # k/v have 128 rows (2 KV heads of 64), q 256, gate/up 704 = 11 row blocks: members of unequal size
    cfg = LlamaConfig(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    venom_hf.prune(model, None, spec, method="magnitude", progress=False)
    venom_hf.compress(model, progress=False)
    return model


class _CountingSpmm:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def test_fused_model_equals_unfused_with_fewer_launches(monkeypatch):
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 9))
    counter = _CountingSpmm(vm.spmm)
    monkeypatch.setattr(vm, "spmm", counter)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    unfused_calls, counter.calls = counter.calls, 0
    assert fuse_projections(model) == 4  # (q, k, v) and (gate, up) in each of the 2 layers
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert unfused_calls == 2 * 7 and counter.calls == 2 * 4  # q|k|v, o, gate|up, down per layer
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert "fused_with=('q_proj', 'k_proj', 'v_proj')" in repr(model.model.layers[0].self_attn.k_proj)


def test_generate_with_kv_cache_is_unchanged_by_fusion():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 5))
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    ref = model.generate(ids, **kw)
    fuse_projections(model)
    out = model.generate(ids, **kw)  # the cache keeps slices of the fused outputs across steps
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_inference_mode_runs_each_member_alone_with_the_unfused_results():
    """Inference tensors have no version counter, so an in-place change between siblings could not be seen:
    under torch.inference_mode every member runs alone (generate with a KV cache included)."""
    model = _tiny_llama()
    unfuse_projections(model)
    ids = torch.randint(0, 128, (2, 5))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    ref = model.generate(ids, **kw)
    assert fuse_projections(model) == 4
    with torch.inference_mode():
        out = model.generate(ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.manual_seed(7)
    mod = _Siblings()
    fuse_projections(mod)
    x0 = torch.randn(4, 96, dtype=torch.float64)
    with torch.inference_mode():
        q, k, v = mod(x0.clone(), inplace=True)  # key and value see 2 * x0
    unfuse_projections(mod)
    torch.testing.assert_close(q, mod.query(x0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k, mod.key(2 * x0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, mod.value(2 * x0), rtol=1e-12, atol=1e-12)


def _spmm_counting_backend(graphs: list):
    """A torch.compile backend that appends each graph's number of venom::spmm calls to ``graphs``."""

    def backend(gm, example_inputs):
        graphs.append(sum(1 for n in gm.graph.nodes if n.op == "call_function" and "venom.spmm" in str(n.target)))
        return gm.forward

    return backend


def test_torch_compile_of_a_fused_model_calls_one_spmm_per_group_in_one_graph():
    """Under torch.compile the trace itself runs the fused SpMM once per input (inductor would not merge
    three identical custom-op calls): 4 SpMMs per decoder layer instead of 7, one graph, no re-compile on
    later calls, and the same logits as eager."""
    graphs = []
    counting_backend = _spmm_counting_backend(graphs)
    for fuse in (False, True):
        model = _tiny_llama(torch.float32)
        if fuse:
            fuse_projections(model)
        layers = model.config.num_hidden_layers
        torch._dynamo.reset()
        graphs.clear()
        with torch.no_grad():
            compiled = torch.compile(model, fullgraph=True, backend=counting_backend)  # no graph break allowed
            for _ in range(3):
                ids = torch.randint(0, 128, (1, 3))
                ref = model(input_ids=ids, use_cache=False).logits
                out = compiled(input_ids=ids, use_cache=False).logits
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert graphs == [(4 if fuse else 7) * layers]  # compiled once
        group = model.model.layers[0].self_attn.q_proj._fused_group
        assert group is None or group._traced_x is None and group._traced_y is None  # nothing kept alive
    torch._dynamo.reset()


def test_torch_compile_after_to_traces_the_unfused_path():
    """A group broken by ``.to()`` and compiled before any eager call: the trace runs each member alone, with
    the members' own (moved) tensors, not the stale fused storage. The next eager call fuses them again."""
    graphs = []
    counting_backend = _spmm_counting_backend(graphs)
    model = _tiny_llama(torch.float32)
    fuse_projections(model)
    model.double()  # the members' parameters are new tensors now
    torch._dynamo.reset()
    ids = torch.randint(0, 128, (1, 3))
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True, backend=counting_backend)(input_ids=ids, use_cache=False).logits
        assert graphs == [7 * model.config.num_hidden_layers]
        group = model.model.layers[0].self_attn.q_proj._fused_group
        assert not group.intact()
        ref = model(input_ids=ids, use_cache=False).logits  # eager: re-fused on the float64 tensors
        assert group.intact() and group.values.dtype == torch.float64
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()


def test_members_are_views_of_one_storage_and_state_dict_is_not():
    model = _tiny_llama()
    attn = model.model.layers[0].self_attn
    before = {n: t.clone() for n, t in model.state_dict().items()}
    storage_before = sum(p.untyped_storage().nbytes() for p in {p.untyped_storage().data_ptr(): p
                                                                  for p in model.parameters()}.values())
    fuse_projections(model)
    ptrs = {m.weight_values.untyped_storage().data_ptr() for m in (attn.q_proj, attn.k_proj, attn.v_proj)}
    assert len(ptrs) == 1  # one storage: no second copy of the weights
    storage_after = sum(p.untyped_storage().nbytes() for p in {p.untyped_storage().data_ptr(): p
                                                                 for p in model.parameters()}.values())
    assert storage_after == storage_before
    sd = model.state_dict()
    assert sd.keys() == before.keys()
    for n, t in sd.items():
        assert torch.equal(t, before[n]), n
    q, k = sd["model.layers.0.self_attn.q_proj.weight_values"], sd["model.layers.0.self_attn.k_proj.weight_values"]
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()  # safetensors-safe


def test_save_pretrained_of_fused_model_round_trips():
    from transformers import AutoModelForCausalLM

    model = _tiny_llama()
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    fuse_projections(model)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        loaded = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval()
    assert isinstance(loaded.model.layers[1].mlp.up_proj, VNMSparseLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=1e-10, atol=1e-10)


class _Siblings(nn.Module):
    """Calls its projections in the ways a model might: same input, changed in place, another input."""

    def __init__(self, k=96, bias=True, spec="16:2:8"):
        super().__init__()
        self.query = VNMSparseLinear.from_linear(nn.Linear(k, 48, bias=bias, dtype=torch.float64), spec)
        self.key = VNMSparseLinear.from_linear(nn.Linear(k, 32, bias=bias, dtype=torch.float64), spec)
        self.value = VNMSparseLinear.from_linear(nn.Linear(k, 40, bias=False, dtype=torch.float64), spec)

    def forward(self, x, other=None, inplace=False):
        q = self.query(x)
        if inplace:
            x.mul_(2)
        k = self.key(x if other is None else other)
        return q, k, self.value(x)


@pytest.mark.parametrize("bias", [True, False])
def test_members_with_padded_rows_bias_and_3d_input(bias):
    torch.manual_seed(1)
    mod = _Siblings(bias=bias)  # value's 40 rows are padded to 48 at V = 16
    x = torch.randn(2, 3, 96, dtype=torch.float64)
    ref = [mod.query(x), mod.key(x), mod.value(x)]
    assert fuse_projections(mod) == 1
    group = mod.query._fused_group
    # one split of the group's output: each member's rows, then its padding rows as a part of their own
    assert group._part_sizes == [48, 32, 40, 8] and group._part_of == [0, 1, 2]
    out = mod(x)
    for o, r in zip(out, ref):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)


def test_inplace_change_or_other_input_is_not_served_from_the_fused_output():
    torch.manual_seed(2)
    mod = _Siblings()
    fuse_projections(mod)
    x = torch.randn(5, 96, dtype=torch.float64)
    x0 = x.clone()
    q, k, v = mod(x, inplace=True)  # key and value see 2 * x0
    unfuse_projections(mod)
    torch.testing.assert_close(q, mod.query(x0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k, mod.key(2 * x0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, mod.value(2 * x0), rtol=1e-12, atol=1e-12)
    fuse_projections(mod)
    other = torch.randn(5, 96, dtype=torch.float64)
    q, k, v = mod(x0, other=other)
    unfuse_projections(mod)
    torch.testing.assert_close(k, mod.key(other), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, mod.value(x0), rtol=1e-12, atol=1e-12)


def test_siblings_served_from_the_group_skip_the_input_checks(monkeypatch):
    """Eager decode's host time: only the member that runs the group's SpMM checks the input; its siblings,
    called with that same tensor, take their slice first (a fresh tensor is checked again)."""
    torch.manual_seed(6)
    mod = _Siblings()
    x = torch.randn(3, 96, dtype=torch.float64)
    ref = [mod.query(x), mod.key(x), mod.value(x)]
    fuse_projections(mod)
    checks = []
    check = vm._check_layer_input
    monkeypatch.setattr(vm, "_check_layer_input", lambda *a, **k: checks.append(a[3]()) or check(*a, **k))
    for o, r in zip(mod(x), ref):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    assert len(checks) == 1
    mod(x.clone())
    assert len(checks) == 2


def test_moved_members_are_fused_again_at_the_next_call():
    torch.manual_seed(3)
    mod = _Siblings()
    x = torch.randn(4, 96, dtype=torch.float64)
    ref = [t.float() for t in mod(x)]
    fuse_projections(mod)
    mod.float()  # new tensors: the members no longer live in the fused storage
    group = mod.query._fused_group
    assert not group.intact()
    out = mod(x.float())
    assert group.intact() and group.values.dtype == torch.float32  # one float32 storage again
    assert mod.query.weight_values.untyped_storage().data_ptr() == group.values.untyped_storage().data_ptr()
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    assert fuse_projections(mod) == 0  # already fused


def test_members_that_cannot_share_a_storage_run_unfused_with_a_warning(caplog):
    torch.manual_seed(3)
    mod = _Siblings()
    x = torch.randn(4, 96, dtype=torch.float64)
    ref = mod(x)
    fuse_projections(mod)
    mod.key.float()  # one member in another dtype: no common storage
    with caplog.at_level(logging.WARNING, logger="venom_hf"):
        q, k, v = mod.query(x), mod.key(x.float()), mod.value(x)
    assert "running them unfused" in caplog.text
    for o, r in zip((q, k.double(), v), ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def test_deepcopy_of_a_fused_model_is_correct_and_can_be_refused():
    import copy

    model = _tiny_llama()
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    assert fuse_projections(model) == 4
    assert fuse_projections(model) == 0  # idempotent
    clone = copy.deepcopy(model)
    assert fuse_projections(clone) == 4  # the copy gets groups of its own members ...
    attn = model.model.layers[0].self_attn
    assert attn.q_proj._fused_group is not None and attn.q_proj._fused_group.members == [attn.q_proj, attn.k_proj,
                                                                                         attn.v_proj]
    assert fuse_projections(model) == 0  # ... and the original's groups are untouched
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-12, atol=1e-12)
    clone2 = copy.deepcopy(model)
    assert unfuse_projections(clone2) == 0  # a copy's unfuse leaves the original's groups alone ...
    a2 = clone2.model.layers[0].self_attn
    assert len({m.weight_values.untyped_storage().data_ptr() for m in (a2.q_proj, a2.k_proj, a2.v_proj)}) == 3
    assert fuse_projections(model) == 0 and attn.q_proj._fused_group is not None
    del model
    with torch.no_grad():
        torch.testing.assert_close(clone(input_ids=ids).logits, ref, rtol=1e-12, atol=1e-12)


def test_mismatched_or_dense_siblings_are_left_alone():
    mod = _Siblings()
    mod.key = VNMSparseLinear.from_linear(nn.Linear(96, 32, dtype=torch.float64), "16:2:16")  # other spec
    assert fuse_projections(mod) == 0
    mod = _Siblings()
    mod.value = nn.Linear(96, 40, dtype=torch.float64)  # dense member
    assert fuse_projections(mod) == 0
    assert all(m._fused_group is None for m in (mod.query, mod.key))


def test_offloaded_members_are_left_alone():
    import types

    mod = _Siblings()
    mod.key._hf_hook = types.SimpleNamespace(offload=True)  # what accelerate's AlignDevicesHook exposes
    assert fuse_projections(mod) == 0
    del mod.key._hf_hook
    assert fuse_projections(mod) == 1


def test_unfuse_gives_members_their_own_tensors():
    mod = _Siblings()
    x = torch.randn(3, 96, dtype=torch.float64)
    ref = mod(x)
    fuse_projections(mod)
    assert unfuse_projections(mod) == 1
    ptrs = {m.weight_values.untyped_storage().data_ptr() for m in (mod.query, mod.key, mod.value)}
    assert len(ptrs) == 3 and all(m.weight_values.is_contiguous() for m in (mod.query, mod.key, mod.value))
    for o, r in zip(mod(x), ref):
        torch.testing.assert_close(o, r, rtol=0, atol=0)
    assert fuse_projections(mod) == 1  # and can be fused again


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 16, 200])
def test_fused_on_gpu_matches_unfused_and_captures_in_a_cuda_graph(tokens):
    if not venom_hf.kernels.is_available():
        pytest.skip("Spatha kernel unavailable")
    model = _tiny_llama(torch.float16).cuda()
    ids = torch.randint(0, 128, (1, tokens), device="cuda")
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.float()
        assert fuse_projections(model) == 4
        out = model(input_ids=ids, use_cache=False).logits.float()
        torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            model(input_ids=ids, use_cache=False)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            static = model(input_ids=ids, use_cache=False).logits
        static.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static.float(), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 9, 300])
def test_fused_siblings_with_bias_and_padded_rows_on_gpu(dtype, tokens):
    if not venom_hf.kernels.is_available():
        pytest.skip("Spatha kernel unavailable")
    torch.manual_seed(4)
    mod = _Siblings(k=256).to("cuda", dtype)  # 48 / 32 / 40 rows at V = 16: padded members, two with bias
    x = torch.randn(tokens, 256, device="cuda", dtype=dtype)
    x64 = x.double().cpu()
    ref = [venom_hf.spmm(x64, m.weight_values.double().cpu(), m.weight_columns.cpu(), m.weight_meta.cpu(),
                         None if m.bias is None else m.bias.double().cpu(), 16, 8, m.out_features)
           for m in (mod.query, mod.key, mod.value)]
    assert fuse_projections(mod) == 1
    out = mod(x)
    for o, r in zip(out, ref):
        err = (o.double().cpu() - r).norm() / r.norm()
        assert o.dtype == dtype and torch.isfinite(o).all() and err < (4e-3 if dtype == torch.float16 else 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 8])
def test_fused_launch_plan_hits_stay_correct_on_gpu(tokens):
    """The eager fast path of a fused group (a launch plan hit for a new input, slices for the siblings)
    against float64: fresh inputs on NaN-poisoned memory, an in-place change between members, and a
    member whose weight is reassigned after its group made its plans."""
    if not venom_hf.kernels.is_available():
        pytest.skip("Spatha kernel unavailable")
    torch.manual_seed(5)
    mod = _Siblings(k=256).to("cuda", torch.float16)
    assert fuse_projections(mod) == 1

    def ref(m, x):
        return venom_hf.spmm(x.double().cpu(), m.weight_values.double().cpu(), m.weight_columns.cpu(),
                             m.weight_meta.cpu(), None if m.bias is None else m.bias.double().cpu(), 16, 8,
                             m.out_features)

    def check(o, r):
        err = (o.double().cpu() - r).norm() / r.norm()
        assert o.dtype == torch.float16 and torch.isfinite(o).all() and err < 4e-3

    group = mod.query._fused_group
    for call in range(4):  # the first call makes the plan, the others hit it
        torch.full((4 * tokens * group.rows,), float("nan"), dtype=torch.float16, device="cuda")  # freed: poison
        x = torch.randn(tokens, 256, device="cuda", dtype=torch.float16)
        x0 = x.clone()
        inplace = call == 2
        q, k, v = mod(x, inplace=inplace)
        check(q, ref(mod.query, x0))
        for o, m in ((k, mod.key), (v, mod.value)):
            check(o, ref(m, 2 * x0 if inplace else x0))
    assert group._plans, "the fused group made no launch plan"
    mod.key.weight_values = nn.Parameter(mod.key.weight_values.detach() * 2, requires_grad=False)
    x = torch.randn(tokens, 256, device="cuda", dtype=torch.float16)
    for o, m in zip(mod(x), (mod.query, mod.key, mod.value)):
        check(o, ref(m, x))
