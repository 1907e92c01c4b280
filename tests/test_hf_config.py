"""VNMConfig validation/serialization, module selection, registration and the sparsity_config= alias."""

from __future__ import annotations

import json
import logging

import pytest
import torch.nn as nn
from hf_testutils import BERT_TARGETS, LLAMA_TARGETS, run_python, tiny_bert, tiny_llama

import venom_hf
from venom_hf.hf import VNMConfig, VNMHfQuantizer, disable_sparsity_config_alias, enable_sparsity_config_alias
from venom_hf.hf.config import DEFAULT_TARGETS
from venom_hf.hf.convert import plan_modules


def test_defaults_are_json_only_and_roundtrip():
    cfg = VNMConfig()
    d = cfg.to_dict()
    assert d == {"quant_method": "venom", "format_version": 1, "spec": "64:2:8", "format": "dense",
                 "mask_init": "magnitude", "targets": list(DEFAULT_TARGETS), "ignore": [], "per_module": {}}
    assert json.loads(json.dumps(d)) == d
    again = VNMConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again.to_dict() == d
    c2 = VNMConfig((16, 2, 8), targets="re:.*proj", ignore=["layers.0.mlp.down_proj"],
                   per_module={"down_proj": "8:4:8", "re:.*k_proj": None}, format="dense")
    assert c2.spec == "16:2:8" and c2.targets == ["re:.*proj"] and c2.per_module == {"down_proj": "8:4:8",
                                                                                     "re:.*k_proj": None}
    assert VNMConfig.from_dict(c2.to_dict()).to_dict() == c2.to_dict()


@pytest.mark.parametrize("kwargs,match", [
    (dict(format="vnm-evil"), "format must be one of"),
    (dict(format=["dense"]), "format must be one of"),
    (dict(format="packed", spec="64:4:8"), "V:2:M"),
    (dict(spec="64:2"), "spec"),
    (dict(spec="64:9:8"), "N must satisfy"),
    (dict(spec="0:2:8"), "V must be >= 1"),
    (dict(targets=5), "targets"),
    (dict(targets=["q_proj", 3]), "targets"),
    (dict(ignore=["re:("]), "invalid regex"),
    (dict(per_module=["q_proj"]), "per_module"),
    (dict(per_module={"q_proj": "2:8"}), "per_module"),
    (dict(quant_method="gptq"), "quant_method"),
    (dict(format_version=2), "newer venom_hf"),
    (dict(format_version="1"), "format_version"),
    (dict(mask_init="module:os.system"), "mask_init"),
])
def test_invalid_values_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VNMConfig(**kwargs)


def test_unknown_keys_warn_and_are_dropped(caplog):
    with caplog.at_level(logging.WARNING, logger="venom_hf"):
        cfg = VNMConfig.from_dict({"quant_method": "venom", "spec": "16:2:8", "future_knob": 3})
    assert "future_knob" in caplog.text
    assert "future_knob" not in cfg.to_dict() and not hasattr(cfg, "future_knob")


def test_default_targets_llama_and_bert():
    llama = tiny_llama()
    plan = plan_modules(llama, VNMConfig("16:2:8"))
    want = {f"model.layers.{i}.{blk}.{p}" for i in range(2) for p in LLAMA_TARGETS
            for blk in (["self_attn"] if p in ("q_proj", "k_proj", "v_proj", "o_proj") else ["mlp"])}
    assert set(plan) == want  # lm_head and embeddings are not targeted
    bert = tiny_bert()
    plan = plan_modules(bert, VNMConfig("16:2:8"))
    assert set(plan) == {f"encoder.layer.{i}.{t}" for i in range(2) for t in BERT_TARGETS}
    assert "pooler.dense" not in plan and isinstance(bert.pooler.dense, nn.Linear)


def test_ignore_per_module_and_regex_targets():
    llama = tiny_llama(tie=True)
    cfg = VNMConfig("16:2:8", targets=["re:model\\.layers\\.0\\..*", "lm_head"], ignore=["o_proj"],
                    per_module={"re:.*down_proj": "16:4:8", "gate_proj": None})
    plan = plan_modules(llama, cfg)
    assert set(plan) == {f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                         "mlp.up_proj", "mlp.down_proj")}
    assert str(plan["model.layers.0.mlp.down_proj"]) == "16:4:8" and str(plan["model.layers.0.mlp.up_proj"]) == "16:2:8"


def test_non_linear_target_is_left_dense_with_one_warning(caplog):
    llama = tiny_llama()
    with caplog.at_level(logging.WARNING, logger="venom_hf"):
        plan = plan_modules(llama, VNMConfig("16:2:8", targets=["q_proj", "input_layernorm"]))
    assert set(plan) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    msgs = [r.getMessage() for r in caplog.records if "input_layernorm" in r.getMessage()]
    assert len(msgs) == 2 and "model.layers.0.input_layernorm" in msgs[0] and "left dense" in msgs[0]


def test_register_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    venom_hf.hf.register()
    venom_hf.hf.register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["venom"] is VNMConfig
    assert AUTO_QUANTIZER_MAPPING["venom"] is VNMHfQuantizer
    from transformers.quantizers import AutoQuantizationConfig

    assert isinstance(AutoQuantizationConfig.from_dict({"quant_method": "venom", "spec": "8:2:8"}), VNMConfig)


def test_alias_on_auto_and_concrete_classes(tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM, LlamaForCausalLM, PreTrainedModel

    from venom_hf.modules import VNMMaskedLinear

    tiny_llama().save_pretrained(tmp_path)
    enable_sparsity_config_alias()
    enable_sparsity_config_alias()  # idempotent: wrapped once
    fn = AutoModelForCausalLM.__dict__["from_pretrained"].__func__
    assert fn._venom_alias and not getattr(fn.__wrapped__, "_venom_alias", False)
    for cls, q in ((AutoModelForCausalLM, "model.layers.0.self_attn.q_proj"),
                   (LlamaForCausalLM, "model.layers.0.self_attn.q_proj"), (AutoModel, "layers.0.self_attn.q_proj")):
        m = cls.from_pretrained(tmp_path, sparsity_config=VNMConfig("16:2:8"))
        assert isinstance(m.get_submodule(q), VNMMaskedLinear), cls
    m = AutoModelForCausalLM.from_pretrained(tmp_path, sparsity_config="16:2:8")  # a spec string is accepted
    assert m.config.quantization_config.spec == "16:2:8"
    with pytest.raises(ValueError, match="not both"):
        AutoModelForCausalLM.from_pretrained(tmp_path, sparsity_config=VNMConfig(), quantization_config=VNMConfig())
    disable_sparsity_config_alias()
    try:
        assert not getattr(PreTrainedModel.__dict__["from_pretrained"].__func__, "_venom_alias", False)
        with pytest.raises(TypeError, match="sparsity_config"):
            AutoModelForCausalLM.from_pretrained(tmp_path, sparsity_config=VNMConfig("16:2:8"))
        # the canonical spelling needs no alias
        m = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=VNMConfig("16:2:8"))
        assert isinstance(m.model.layers[0].mlp.up_proj, VNMMaskedLinear)
    finally:
        enable_sparsity_config_alias()


def test_env_var_disables_alias_and_bad_config_json_is_rejected(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    cfg_file = tmp_path / "config.json"
    d = json.loads(cfg_file.read_text())
    d["quantization_config"] = {"quant_method": "venom", "spec": "16:2:8", "format": "evil.module:payload"}
    cfg_file.write_text(json.dumps(d))
    code = f"""
import sys, venom_hf
from transformers import AutoModelForCausalLM, PreTrainedModel
print("ALIAS", getattr(PreTrainedModel.__dict__["from_pretrained"].__func__, "_venom_alias", False))
try:
    AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
except ValueError as e:
    print("REJECTED", e)
print("EVIL_IMPORTED", any(m.startswith("evil") for m in sys.modules))
"""
    r = run_python(code, {"VENOM_HF_NO_ALIAS": "1"}, pythonpath=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ALIAS False" in r.stdout
    assert "REJECTED VNMConfig.format must be one of ['dense', 'packed']" in r.stdout
    assert "EVIL_IMPORTED False" in r.stdout


@pytest.mark.parametrize("targets", [
    None,                                             # DEFAULT_TARGETS
    ["re:.*"],                                        # everything: the default ignore list decides
    ["re:model\\.layers\\.0\\..*", "lm_head"],        # whole-name regex + a head that is always skipped
    ["re:.*proj"], ["re:proj"],                       # "re:proj" matches no whole name, in both
    ["mlp.up_proj", "re:.*\\.(q|v)_proj"],
])
def test_same_pattern_selects_the_same_modules_in_config_and_pruning(targets):
    """VNMConfig (load-time sparsification) and find_targets (pruning) read one pattern syntax and one
    default ignore list, so a pruned model's saved config rebuilds exactly the pruned layers."""
    from transformers import BertConfig, BertForSequenceClassification

    from venom_hf.pruning import find_targets

    for model in (tiny_llama(), BertForSequenceClassification(BertConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=128))):
        cfg = VNMConfig("16:2:8", targets=targets)
        by_config = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and cfg.is_target(n)}
        try:
            by_pruning = set(find_targets(model, cfg.targets))
        except ValueError:  # nothing selected
            by_pruning = set()
        assert by_config == by_pruning, targets
        assert not any(n.endswith(("lm_head", "classifier", "pooler.dense")) for n in by_config)


def test_find_targets_ignore_adds_to_the_default_ignore_list():
    from venom_hf.pruning import find_targets

    names = set(find_targets(tiny_llama(), ["re:.*"], ignore=["o_proj"]))
    assert names and not any(n.endswith(("o_proj", "lm_head")) for n in names)


def test_packed_checkpoint_of_a_newer_format_version_is_refused(tmp_path):
    """A checkpoint written by a newer venom_hf (format_version, or `version` as a hand edit writes it)
    raises at from_pretrained with the version found, the version supported and what to do."""
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=VNMConfig("16:2:8",
                                                                                                   format="packed"))
    model.save_pretrained(tmp_path / "packed")
    AutoModelForCausalLM.from_pretrained(tmp_path / "packed")  # loads as written
    cfg_file = tmp_path / "packed" / "config.json"
    written = json.loads(cfg_file.read_text())
    assert written["quantization_config"]["format_version"] == 1
    for key in ("version", "format_version"):
        edited = json.loads(json.dumps(written))
        edited["quantization_config"][key] = 99
        cfg_file.write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=r"format_version 99, but this venom_hf reads format_version 1 at most"
                                             r".*Upgrade venom_hf"):
            AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
