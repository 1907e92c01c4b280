"""defer_stop_check: generate() reads its stop flag one step late and returns exactly what the stock loop
returns, caches included. On CPU the deferral is enabled by adding "cpu" to its device types."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_testutils import input_ids, tiny_llama

pytest.importorskip("transformers")
from transformers.generation import utils as gen_utils  # noqa: E402

from venom_hf.hf import generation  # noqa: E402
from venom_hf.hf.generation import defer_stop_check, stop_check_deferred  # noqa: E402

if not hasattr(gen_utils, "DeferredStopCheck"):
    pytest.skip("this transformers has no DeferredStopCheck", allow_module_level=True)


class _HostEvent:
    """CPU work is synchronous: an event that is always complete (the cpu backend has no events)."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(generation, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(gen_utils.torch, "Event", _HostEvent)
    generation._install()
    calls = []
    cls = gen_utils.DeferredStopCheck
    orig_finish = cls.finish

    def finish(self):
        steps = orig_finish(self)
        calls.append(steps)
        return steps

    monkeypatch.setattr(cls, "finish", finish)
    return calls


def _generate(model, prompt, eos, cache=None, **kw):
    model.generation_config.pad_token_id = 0
    extra = {"past_key_values": cache} if cache is not None else {}
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                          eos_token_id=eos, **extra, **kw)


def _early_eos(model, prompt) -> int:
    """A token that greedy decoding emits a few steps in, so that the stop comes from eos, not the length."""
    out = _generate(model, prompt, eos=None)
    return int(out[0, prompt.shape[1] + 4])


@torch.no_grad()
def test_deferred_generate_equals_stock_and_undoes_the_extra_step(on_cpu):
    stock, deferred = tiny_llama(seed=3), defer_stop_check(tiny_llama(seed=3))
    prompt = input_ids(shape=(1, 6))
    eos = _early_eos(stock, prompt)
    want = _generate(stock, prompt, eos)
    assert on_cpu == []  # the model without deferral kept transformers' stock loop
    got = _generate(deferred, prompt, eos)
    assert on_cpu == [1]  # deferred: the step after eos ran and was undone
    assert torch.equal(got, want)
    assert want.shape[1] < prompt.shape[1] + 12


@torch.no_grad()
@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
def test_a_returned_cache_is_rolled_back_to_the_stock_state(on_cpu, cache_kind):
    from transformers import DynamicCache, StaticCache

    stock, deferred = tiny_llama(seed=4), defer_stop_check(tiny_llama(seed=4))
    prompt = input_ids(shape=(2, 5), seed=7)
    eos = _early_eos(stock, prompt[:1])

    def new_cache(model):
        if cache_kind == "static":
            return StaticCache(config=model.config, max_cache_len=prompt.shape[1] + 30)
        return DynamicCache(config=model.config)

    caches = {}
    outs = {}
    for name, model in (("stock", stock), ("deferred", deferred)):
        caches[name] = new_cache(model)
        outs[name] = _generate(model, prompt, eos, cache=caches[name])
    assert on_cpu == [1]
    assert torch.equal(outs["deferred"], outs["stock"])
    assert int(caches["deferred"].get_seq_length()) == int(caches["stock"].get_seq_length())
    # the rolled-back cache continues exactly like the stock one
    nxt = {name: _generate(model, outs[name], None, cache=caches[name])
           for name, model in (("stock", stock), ("deferred", deferred))}
    assert torch.equal(nxt["deferred"], nxt["stock"])


def test_enabling_is_per_model_idempotent_and_reversible():
    model, other = tiny_llama(), tiny_llama()
    assert defer_stop_check(defer_stop_check(model)) is model
    assert stop_check_deferred(model) and not stop_check_deferred(other)
    twin = copy.deepcopy(model)
    assert stop_check_deferred(twin) and twin.generate.__self__ is twin  # bound to the copy, not the original
    defer_stop_check(model, enabled=False)
    assert not stop_check_deferred(model) and "generate" not in model.__dict__
    with pytest.raises(TypeError, match="torch.nn.Module"):
        defer_stop_check("model")


def test_is_supported_only_while_a_deferring_model_generates(monkeypatch):
    monkeypatch.setattr(generation, "DEVICE_TYPES", ("cuda", "cpu"))
    generation._install()
    check = gen_utils.DeferredStopCheck.is_supported
    cpu = torch.device("cpu")
    assert not check(cpu, None, False, False)
    token = generation._ACTIVE.set(True)
    try:
        assert check(cpu, None, False, False)
        assert not check(cpu, None, False, True)  # assisted decoding keeps the stock check
        assert not check(torch.device("meta"), None, False, False)
    finally:
        generation._ACTIVE.reset(token)


def test_compress_turns_the_deferral_on():
    import venom_hf

    model = tiny_llama()
    venom_hf.prune(model, None, "64:2:8", method="magnitude", progress=False)
    venom_hf.compress(model, progress=False)
    assert stop_check_deferred(model)
