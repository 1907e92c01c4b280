"""transformers' own compiled path for packed models: ``generate(..., cache_implementation="static")``.

The quantizer lets transformers compile (``is_compileable``); the decode step traces into one graph with the
fake ``venom::spmm`` (one SpMM per fused group), is not re-compiled across decode steps, and generates the
tokens of eager generation. On the CPU through a counting backend; the CUDA-graph run (mode
"reduce-overhead") is in tests/test_gpu_eager_path.py.
"""

from __future__ import annotations

import pytest
import torch

import venom_hf


def _tiny_packed(model_type: str):
    import transformers

    torch.manual_seed(0)
    if model_type == "llama":
        cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=352, num_attention_heads=4,
                                       num_key_value_heads=2, num_hidden_layers=2, vocab_size=96,
                                       max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg)
    else:  # gemma3: q/k norms, one KV head. Global layers only: transformers' static sliding-window cache
        # layer guards on its fill length and re-compiles every step for dense models too
        cfg = transformers.Gemma3TextConfig(hidden_size=128, intermediate_size=256, num_attention_heads=2,
                                            num_key_value_heads=1, head_dim=64, num_hidden_layers=2, vocab_size=96,
                                            max_position_embeddings=64, layer_types=["full_attention"] * 2)
        model = transformers.Gemma3ForCausalLM(cfg)
    model = model.float().eval()
    venom_hf.prune(model, None, "64:2:8", method="magnitude", progress=False)
    venom_hf.compress(model, progress=False)
    venom_hf.fuse_projections(model)
    return model


def _counting_backend(graphs: list):
    def backend(gm, example_inputs):
        graphs.append(sum(1 for n in gm.graph.nodes if n.op == "call_function" and "venom.spmm" in str(n.target)))
        return gm.forward

    return backend


@pytest.mark.parametrize("model_type", ["llama", "gemma3"])
def test_static_cache_generate_compiles_one_graph_and_matches_eager(model_type):
    from transformers import CompileConfig

    model = _tiny_packed(model_type)
    assert model.hf_quantizer.is_compileable
    ids = torch.randint(0, 96, (2, 5))
    kw = dict(max_new_tokens=7, min_new_tokens=7, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(ids, **kw)
        graphs: list = []
        torch._dynamo.reset()
        cc = CompileConfig(fullgraph=True, dynamic=False, backend=_counting_backend(graphs), mode=None)
        cc._compile_all_devices = True  # transformers compiles on CUDA only unless told otherwise
        compiled = model.generate(ids, cache_implementation="static", compile_config=cc, **kw)
        again = model.generate(ids, cache_implementation="static", compile_config=cc, **kw)
    layers = model.config.num_hidden_layers
    # one graph for all decode steps of both calls (no re-compile), 4 SpMMs per layer: q|k|v, o, gate|up, down
    assert graphs == [4 * layers]
    assert torch.equal(compiled, eager) and torch.equal(again, eager)
    group = model.model.layers[0].self_attn.q_proj._fused_group
    assert group._traced_x is None and group._traced_y is None and group._x is None  # nothing kept alive
    torch._dynamo.reset()


def test_loading_a_packed_checkpoint_fuses_projections(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tiny_packed("llama")
    venom_hf.unfuse_projections(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    attn, mlp = loaded.model.layers[0].self_attn, loaded.model.layers[0].mlp
    assert attn.q_proj._fused_group is not None and attn.q_proj._fused_group is attn.v_proj._fused_group
    assert mlp.gate_proj._fused_group is not None and mlp.down_proj._fused_group is None
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)
    # the checkpoint a fused model writes is the unfused one, tensor for tensor
    loaded.save_pretrained(tmp_path / "again")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_compiled_graph_takes_the_packed_weights_as_static_inputs(monkeypatch):
    """Several models (or batch sizes) in one process compile the same forward again, as
    venom_hf.bench.generate does with its formats: the fused groups' tensors must stay static, fixed-shape
    inputs in the later graphs too (nn.Parameters: dynamo neither makes their sizes dynamic when a second
    model's groups differ in shape nor treats them as per-call inputs), else an 8B model's later graphs take
    ~200 of them as non-static CUDA-graph inputs. Only the step's own inputs may be non-static, as for the
    dense model."""
    from venom_hf.bench import generate as bench

    models = []
    for fmt in ("dense", "64:2:8", "64:2:16"):
        model = bench.build_model("llama3-8b", True, torch.device("cpu"), torch.float32)
        models.append(bench.apply_format(model, fmt))
    group = models[1].model.layers[0].self_attn.q_proj._fused_group
    assert all(isinstance(t, torch.nn.Parameter) for t in (group.values, group.columns, group.meta))
    assert not any(t is group.values for t in models[1].parameters())  # registered on no module
    # inductor's graph compiler is told which inputs are static; count the others per graph (tensors that
    # CUDA-graph trees copy in at every replay, and the sizes of tensors that dynamo made dynamic)
    import torch._inductor.compile_fx as compile_fx

    counts: list = []
    inner = compile_fx._compile_fx_inner

    def counting_inner(gm, example_inputs, **kw):
        counts.append(len(example_inputs) - len(set(kw.get("static_input_idxs", ()))))
        return inner(gm, example_inputs, **kw)

    monkeypatch.setattr(compile_fx, "_compile_fx_inner", counting_inner)
    torch._dynamo.reset()
    import torch._functorch.config as aot_config

    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), \
            aot_config.patch(enable_autograd_cache=False):
        for model, batch in [(m, 1) for m in models] + [(models[1], 2)]:
            forward = torch.compile(model.forward, fullgraph=True)
            forward(input_ids=torch.ones(batch, 1, dtype=torch.long), past_key_values=bench.new_static_cache(model, 16),
                    cache_position=torch.tensor([3]), use_cache=True)
    torch._dynamo.reset()
    assert len(counts) == 4 and max(counts) <= 4, counts


def test_compiled_step_guards_only_what_the_kernels_read():
    """The compiled graph re-checks its guards on the host at every call (every decode step): a fused
    member's own weight views, which the fused path never reads, must not be among them, nor the spec
    object that every layer shares (an identity guard in Python per layer and use)."""
    from transformers import StaticCache

    model = _tiny_packed("llama")
    cache = StaticCache(config=model.config, max_cache_len=32)
    torch._dynamo.reset()
    with torch.no_grad():
        model(torch.randint(0, 96, (1, 4)), past_key_values=cache, cache_position=torch.arange(4), use_cache=True)
        out = torch._dynamo.explain(model.forward)(torch.randint(0, 96, (1, 1)), past_key_values=cache,
                                                     cache_position=torch.tensor([4]), use_cache=True)
    torch._dynamo.reset()
    assert out.graph_count == 1
    names = [g.name for g in out.out_guards]
    packed = [n for n in names if "_parameters['weight_" in n]
    fused = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    assert packed and not any(f"['{f}']" in n for n in packed for f in fused), packed
    # the unfused layers' tensors and the groups' tensors are guarded: 3 per SpMM (values, columns, meta)
    layers = model.config.num_hidden_layers
    assert len(packed) == 3 * 2 * layers
    assert sum(n.endswith(("_fused_group.values", "_fused_group.columns", "_fused_group.meta")) for n in names) \
        == 3 * 2 * layers
    assert not any("_spec" in n for n in names)
