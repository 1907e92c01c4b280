"""VNMHfQuantizer loading paths, bad checkpoints, Trainer, dequantize and accelerate offload (CPU)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn as nn
from hf_testutils import input_ids, linear_names, tiny_bert, tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

from venom_hf.format import VNMFormatError, make_mask
from venom_hf.hf import VNMConfig, VNMHfQuantizer, compress
from venom_hf.hf.convert import PACKED_MARKER
from venom_hf.modules import VNMMaskedLinear, VNMSparseLinear

SPEC = "16:2:8"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama_base")
    model = tiny_llama(intermediate=200)  # 200 columns: not a multiple of 8 groups -> padding
    model.save_pretrained(d)
    return d, model


def _reference_logits(model, spec, ids):
    """Plain-transformers reference: each targeted weight multiplied by its magnitude mask."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in ref.named_modules():
            if name.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                m.weight.mul_(make_mask(m.weight, spec))
        return ref(ids).logits


def test_dense_checkpoint_to_masked(llama_dir, caplog):
    path, base = llama_dir
    with caplog.at_level(logging.WARNING):
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=VNMConfig(SPEC))
    assert "MISSING" not in caplog.text and "UNEXPECTED" not in caplog.text
    assert isinstance(model.hf_quantizer, VNMHfQuantizer) and model.quantization_method == "venom"
    masked = linear_names(model, VNMMaskedLinear)
    assert len(masked) == 14 and type(model.lm_head) is nn.Linear
    for name in masked:
        w0 = base.get_submodule(name).weight
        mod = model.get_submodule(name)
        assert torch.equal(mod.mask, make_mask(w0, SPEC)), name
        assert torch.equal(mod.weight.detach(), w0 * mod.mask), name
    ids = input_ids()
    with torch.no_grad():
        out = model(ids).logits
    assert torch.equal(out, _reference_logits(base, SPEC, ids))


def test_dense_checkpoint_to_packed_matches_masked(llama_dir):
    path, base = llama_dir
    masked = AutoModelForCausalLM.from_pretrained(path, quantization_config=VNMConfig(SPEC))
    packed = AutoModelForCausalLM.from_pretrained(path, quantization_config=VNMConfig(SPEC, format="packed"))
    names = linear_names(packed, VNMSparseLinear)
    assert len(names) == 14 and not linear_names(packed, VNMMaskedLinear)
    for name in names:
        mod = packed.get_submodule(name)
        assert "weight" not in dict(mod.named_parameters())  # the dense placeholder is gone
        assert torch.equal(mod.to_dense_weight(), masked.get_submodule(name).weight.detach()), name
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, masked(ids).logits, rtol=1e-5, atol=1e-5)


def test_bert_targets_and_pooler(tmp_path):
    bert = tiny_bert()
    bert.save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, sparsity_config=VNMConfig("8:2:8", format="packed"))
    assert len(linear_names(model, VNMSparseLinear)) == 12
    assert type(model.pooler.dense) is nn.Linear
    assert torch.equal(model.pooler.dense.weight, bert.pooler.dense.weight)


def _packed_checkpoint(llama_dir, tmp_path):
    path, _ = llama_dir
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=VNMConfig(SPEC, format="packed"))
    model.save_pretrained(tmp_path)
    return tmp_path / "model.safetensors"


@pytest.mark.parametrize("corrupt,match", [
    ("shape", r"model\.layers\.1\.mlp\.down_proj\.weight_values: shape \(128, 25, 2\)"),
    ("dtype", r"model\.layers\.1\.mlp\.down_proj\.weight_columns: dtype I32"),
    ("range", r"model\.layers\.1\.mlp\.down_proj\.weight_columns: 1 indices out of range \[0, 8\)"),
    ("meta", r"model\.layers\.1\.mlp\.down_proj\.weight_meta: 1 entries are not a valid 2:4 nibble"),
    ("missing", r"model\.layers\.1\.mlp\.down_proj\.weight_meta: missing"),
])
def test_bad_packed_tensors_raise_naming_the_tensor(llama_dir, tmp_path, corrupt, match):
    f = _packed_checkpoint(llama_dir, tmp_path)
    sd = load_file(f)
    key = "model.layers.1.mlp.down_proj.weight_"
    if corrupt == "shape":
        sd[key + "values"] = sd[key + "values"][:, :25].contiguous()
    elif corrupt == "dtype":
        sd[key + "columns"] = sd[key + "columns"].to(torch.int32)
    elif corrupt == "range":
        sd[key + "columns"][0, 0, 3] = 200
    elif corrupt == "meta":
        sd[key + "meta"][0, 0] = 0b0001  # pos0 == pos1
    elif corrupt == "missing":
        del sd[key + "meta"]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(VNMFormatError, match=match):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_nonfinite_layer_is_left_dense_with_warning(llama_dir, tmp_path, caplog):
    path, base = llama_dir
    sd = load_file(path / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with caplog.at_level(logging.WARNING, logger="venom_hf"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=VNMConfig(SPEC, format="packed"))
    up = model.model.layers[0].mlp.up_proj
    assert type(up) is nn.Linear and bool(up.weight.isnan()[0, 0])
    assert torch.equal(up.weight[1:], base.model.layers[0].mlp.up_proj.weight[1:])
    assert len(linear_names(model, VNMSparseLinear)) == 13
    warnings = [r.getMessage() for r in caplog.records if "model.layers.0.mlp.up_proj" in r.getMessage()]
    assert len(warnings) == 1 and "left dense" in warnings[0]


def test_trainer_step_keeps_pruned_weights_zero(llama_dir, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    path, _ = llama_dir
    model = AutoModelForCausalLM.from_pretrained(path, sparsity_config=VNMConfig(SPEC))
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, VNMMaskedLinear)}
    ids = input_ids(shape=(8, 16))
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                             weight_decay=0.1, optim="adamw_torch", report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds)  # validate_quantization_for_training passes
    trainer.train()
    for name, w0 in before.items():
        mod = model.get_submodule(name)
        w = mod.weight.detach()
        assert bool((w[~mod.mask] == 0).all()), name
        assert bool((w[mod.mask] != w0[mod.mask]).any()), name  # the kept weights trained


def test_dequantize_masked_and_packed(llama_dir):
    path, _ = llama_dir
    ids = input_ids()
    for fmt in ("dense", "packed"):
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=VNMConfig(SPEC, format=fmt))
        with torch.no_grad():
            ref = model(ids).logits
        model.dequantize()
        assert not linear_names(model, (VNMMaskedLinear, VNMSparseLinear))
        assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
        assert not getattr(model, "is_quantized", False) and not hasattr(model.config, "quantization_config")
        assert PACKED_MARKER not in dict(model.named_buffers())
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["dense", "packed"])
def test_device_map_and_disk_offload(llama_dir, tmp_path, fmt):
    path, _ = llama_dir
    src = tmp_path / "ckpt"
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=VNMConfig(SPEC, format=fmt))
    model.save_pretrained(src)
    ids = input_ids()
    with torch.no_grad():
        ref = model(ids).logits
    # (venom checkpoint, dense checkpoint + config): both pre-quantized and on-the-fly loading paths
    for ckpt, kw in ((src, {}), (path, dict(quantization_config=VNMConfig(SPEC, format=fmt)))):
        auto = AutoModelForCausalLM.from_pretrained(ckpt, device_map="auto", **kw)
        with torch.no_grad():
            assert torch.equal(auto(ids).logits, ref)
        mem = {"cpu": 700_000 if fmt == "dense" else 450_000}  # forces a cpu / disk split
        off = AutoModelForCausalLM.from_pretrained(ckpt, device_map="auto", max_memory=mem,
                                                   offload_folder=str(tmp_path / f"off{len(kw)}"), **kw)
        placements = set(off.hf_device_map.values())
        assert placements == {"cpu", "disk"}, off.hf_device_map
        vnm = [m for m in off.modules() if isinstance(m, (VNMMaskedLinear, VNMSparseLinear))]
        assert any(all(p.is_meta for p in m.parameters()) for m in vnm)  # some VNM layers live on disk
        with torch.no_grad():
            # offloaded layers stay unfused (the loaded models fuse q|k|v, gate|up): the same sums in another
            # order, so equal up to float32 rounding
            torch.testing.assert_close(off(ids).logits, ref, rtol=1e-5, atol=1e-6)


def test_compress_in_place(llama_dir, caplog):
    path, _ = llama_dir
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=VNMConfig(SPEC, per_module={"re:.*layers\\.1\\.mlp\\.down_proj": "16:4:8"}))
    ids = input_ids()
    with torch.no_grad():
        ref = model(ids).logits
    with caplog.at_level(logging.WARNING, logger="venom_hf"):
        assert compress(model) is model
    assert len(linear_names(model, VNMSparseLinear)) == 13
    kept = linear_names(model, VNMMaskedLinear)
    assert kept == {"model.layers.1.mlp.down_proj"}
    assert sum("model.layers.1.mlp.down_proj" in r.getMessage() for r in caplog.records) == 1
    assert model.config.quantization_config.format == "packed"
    assert json.loads(model.config.to_json_string())["quantization_config"]["format"] == "packed"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_compress_model_built_without_from_pretrained():
    model = tiny_llama()
    for name in [n for n, m in model.named_modules() if n.endswith("up_proj")]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                VNMMaskedLinear.from_linear(model.get_submodule(name), SPEC))
    compress(model, progress=False)
    assert len(linear_names(model, VNMSparseLinear)) == 2
    assert isinstance(model.config.quantization_config, VNMConfig) and model.config.quantization_config.format == "packed"
    assert isinstance(model.hf_quantizer, VNMHfQuantizer)
