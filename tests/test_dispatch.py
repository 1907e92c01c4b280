"""Per-card dispatch tables (venom_hf.kernels.dispatch) and the tuner's CPU parts (venom_hf.bench.tune):
lookups, merging, validation, the shipped tables, and on a GPU that a plan follows its table's config."""

from __future__ import annotations

import json

import pytest
import torch

from venom_hf.bench import tune
from venom_hf.kernels import configs, dispatch, ops


def entry(tokens, config, rows=4096, groups=512, v=64, m=8):
    return {"v": v, "m": m, "rows": rows, "groups": groups, "tokens": tokens, "config": config}


def table(entries, num_sms=132, card="NVIDIA Test"):
    return {"format": dispatch.TABLE_FORMAT, "card": card, "num_sms": num_sms, "entries": entries}


def test_lookup_takes_the_smallest_measured_token_count_at_or_above_and_keeps_decode_and_prefill_apart():
    t = dispatch.DispatchTable([entry(1, "ring_n1r1sel"), entry(4, "stream_n1r2"), entry(16, "ring_n2r2w8"),
                                entry(64, "large64"), entry(512, "kt64x128k2"), entry(4096, "kt128x128")])
    assert len(t) == 6
    assert t.lookup(64, 8, 4096, 512, 1) == "ring_n1r1sel"
    assert t.lookup(64, 8, 4096, 512, 2) == "stream_n1r2"
    assert t.lookup(64, 8, 4096, 512, 4) == "stream_n1r2"
    assert t.lookup(64, 8, 4096, 512, 9) == "ring_n2r2w8"
    assert t.lookup(64, 8, 4096, 512, 16) == "ring_n2r2w8"
    assert t.lookup(64, 8, 4096, 512, 17) == "large64"  # the first prefill entry, never a decode one
    assert t.lookup(64, 8, 4096, 512, 300) == "kt64x128k2"
    assert t.lookup(64, 8, 4096, 512, 100000) == "kt128x128"  # above the last: the last
    # other shapes or formats: not in the table
    assert t.lookup(64, 16, 4096, 512, 1) is None
    assert t.lookup(64, 8, 4096, 256, 1) is None
    only_decode = dispatch.DispatchTable([entry(8, "ring_n1r1")])
    assert only_decode.lookup(64, 8, 4096, 512, 1) == "ring_n1r1"
    assert only_decode.lookup(64, 8, 4096, 512, 16) == "ring_n1r1"
    assert only_decode.lookup(64, 8, 4096, 512, 17) is None  # no prefill entry: the heuristic decides


def test_later_entries_win():
    t = dispatch.DispatchTable([entry(1, "ring_n1r1"), entry(1, "ring_n1r1sel")])
    assert len(t) == 1 and t.lookup(64, 8, 4096, 512, 1) == "ring_n1r1sel"


@pytest.mark.parametrize("bad, words", [
    ({"format": 2, "card": "x", "num_sms": 1, "entries": []}, ["format 2", "format 1"]),
    ({"format": 1, "card": "x", "entries": []}, ["num_sms"]),
    (table([{"v": 64, "m": 8, "rows": 64, "groups": 8, "tokens": 1}]), ["entry 0", "config"]),
    (table([entry(1, "warp_specialized_9000")]), ["warp_specialized_9000", "does not ship", "ring_n1r1"]),
    ([1, 2], ["not a JSON object"]),
])
def test_validation_names_the_problem(bad, words):
    with pytest.raises(dispatch.DispatchTableError) as e:
        dispatch.validate_table(bad, "t.json")
    for w in words:
        assert w in str(e.value)


def test_package_and_user_tables_merge_user_wins_and_other_sm_counts_are_ignored(tmp_path, monkeypatch, caplog):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    monkeypatch.setattr(dispatch, "PACKAGE_TABLES", pkg)
    monkeypatch.setenv("VENOM_HF_CACHE", str(tmp_path / "cache"))
    dispatch.reload()
    card = "NVIDIA Test Card"
    assert dispatch.card_slug(card) == "nvidia-test-card"
    assert dispatch.config_for(card, 132, 64, 8, 4096, 512, 1) is None  # no table at all
    (pkg / "nvidia-test-card.json").write_text(json.dumps(table([entry(1, "ring_n1r1"), entry(8, "stream_n1r1")])))
    user = dispatch.user_table_path(card)
    user.parent.mkdir(parents=True)
    user.write_text(json.dumps(table([entry(1, "ring_n1r1sel")])))
    dispatch.reload()
    assert dispatch.config_for(card, 132, 64, 8, 4096, 512, 1) == "ring_n1r1sel"
    assert dispatch.config_for(card, 132, 64, 8, 4096, 512, 8) == "stream_n1r1"
    monkeypatch.setenv("VENOM_HF_DISPATCH", "heuristic")
    assert dispatch.config_for(card, 132, 64, 8, 4096, 512, 1) is None
    monkeypatch.delenv("VENOM_HF_DISPATCH")
    # a table measured with another SM count is not used, and the log says why
    dispatch.reload()
    with caplog.at_level("WARNING", logger="venom_hf"):
        assert dispatch.config_for(card, 114, 64, 8, 4096, 512, 1) is None
    assert "132 SMs" in caplog.text and "114" in caplog.text
    # an unreadable user table is ignored with a warning, the package's still counts
    user.write_text("{not json")
    dispatch.reload()
    with caplog.at_level("WARNING", logger="venom_hf"):
        assert dispatch.config_for(card, 132, 64, 8, 4096, 512, 1) == "ring_n1r1"
    assert str(user) in caplog.text
    dispatch.reload()


def test_shipped_tables_are_valid_and_name_shipped_configs():
    files = sorted(dispatch.PACKAGE_TABLES.glob("*.json"))
    assert files, "the package ships at least one measured table"
    for f in files:
        t = json.loads(f.read_text())
        dispatch.validate_table(t, str(f))
        assert dispatch.card_slug(t["card"]) == f.stem
        assert t["entries"] and all(e["config"] in configs.BY_NAME for e in t["entries"])


def test_config_shapes_of_decoder_and_encoder_configs():
    from transformers import BertConfig, LlamaConfig

    from venom_hf.bench.generate import model_config

    llama = tune.config_shapes(model_config("llama3-8b"))
    assert llama == {"q": (4096, 4096), "kv": (1024, 4096), "o": (4096, 4096), "up": (14336, 4096),
                     "down": (4096, 14336), "qkv fused": (6144, 4096), "gate|up fused": (28672, 4096)}
    gemma = tune.config_shapes(model_config("gemma3-270m"))
    assert gemma["q"] == (1024, 640) and gemma["o"] == (640, 1024) and gemma["qkv fused"] == (1536, 640)
    bert = tune.config_shapes(BertConfig())
    assert bert == {"q": (768, 768), "kv": (768, 768), "o": (768, 768), "up": (3072, 768), "down": (768, 3072),
                    "qkv fused": (2304, 768)}
    small = tune.config_shapes(LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                           num_key_value_heads=2))
    assert small["kv"] == (32, 64) and small["gate|up fused"] == (192, 64)


@pytest.mark.parametrize("T", [1, 3, 8, 16, 17, 64, 65, 512, 4096])
@pytest.mark.parametrize("spec", ["64:2:8", "64:2:16", "128:2:8"])
def test_tuner_candidates_are_configs_the_search_really_runs(T, spec):
    from venom_hf import VNMSpec

    s = VNMSpec.parse(spec)
    rows, groups = tune.padded(4096, 4096, s)
    names = tune.candidates(T, rows, groups, s, 132, 227 * 1024)
    assert names
    heur = tune.heuristic_choice(T, rows, groups, s, 132, 227 * 1024)
    assert heur in names  # the heuristic's own pick is always timed, so the report can compare
    for n in names:
        c = configs.BY_NAME[n]
        assert ops.choose_config(T, rows, groups, s.v, s.m, 132, 227 * 1024, n)[0].name == n
        if T <= dispatch.DECODE_MAX_TOKENS:
            assert c.kernel != "kt"
        else:
            assert c.kernel not in ("ring", "stream")


def test_merge_into_replaces_same_keys_and_keeps_the_rest(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps(table([entry(1, "ring_n1r1"), entry(8, "stream_n1r1")])))
    merged = tune.merge_into(p, table([entry(1, "ring_n1r1sel"), entry(512, "kt64x128k2")]))
    got = {(e["tokens"], e["config"]) for e in merged["entries"]}
    assert got == {(1, "ring_n1r1sel"), (8, "stream_n1r1"), (512, "kt64x128k2")}
    # another SM count: the new table alone
    assert tune.merge_into(p, table([entry(1, "ring_n1r1sel")], num_sms=114))["entries"] == [entry(1, "ring_n1r1sel")]


def test_report_compares_with_the_heuristic():
    es = [dict(entry(1, "ring_n1r1sel"), shape=[4096, 4096], us=8.0, heuristic="ring_n1r1", heuristic_us=10.0,
               dense_us=16.0),
          dict(entry(512, "kt64x128k2"), shape=[4096, 4096], us=50.0, heuristic="kt64x128k2", heuristic_us=50.0,
               dense_us=25.0)]
    md = tune.report(es, "NVIDIA Test")
    assert "| 4096x4096 | 64:2:8 | 1 | ring_n1r1sel | 8.0 | ring_n1r1 | 10.0 | 1.25 | 2.00 |" in md
    assert "| 4096x4096 | 64:2:8 | 512 | kt64x128k2 | 50.0 | kt64x128k2 | 50.0 | 1.00 | 0.50 |" in md
    assert "2 cases" in md and "1 cases more than 2 % faster" in md


def test_cli_tune_without_gpu_or_shapes_says_so(capsys):
    from venom_hf import cli

    if torch.cuda.is_available():
        pytest.skip("this checks the message of a machine without a GPU")
    assert cli.main(["tune", "--preset", "llama3-8b"]) == 2
    assert "CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tune._parse_args([])


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_plan_follows_its_table_and_matches_the_heuristic_result(tmp_path, monkeypatch):
    if not torch.cuda.is_available() or not ops.is_available():
        pytest.skip("needs a CUDA GPU with the Spatha kernel")
    import venom_hf as vf
    from venom_hf.bench.spmm import random_vnm_mask

    monkeypatch.setenv("VENOM_HF_CACHE", str(tmp_path))
    card = torch.cuda.get_device_name()
    _, nsm, smem = ops._device_info(torch.cuda.current_device())
    gen = torch.Generator(device="cuda").manual_seed(0)
    R, K, spec = 1000, 768, vf.VNMSpec.parse("64:2:8")
    w = torch.randn(R, K, device="cuda", generator=gen).half()
    p = vf.pack(w, spec, mask=random_vnm_mask(R, K, 64, 8, gen))
    rows, groups = p.values.shape[:2]
    for T in (1, 5, 100):
        x = torch.randn(T, K, device="cuda", generator=gen).half()
        heur = tune.heuristic_choice(T, rows, groups, spec, nsm, smem)
        other = [n for n in tune.candidates(T, rows, groups, spec, nsm, smem) if n != heur][0]
        path = dispatch.user_table_path(card)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table([entry(T, other, rows, groups)], num_sms=nsm, card=card)))
        dispatch.reload()
        ops._PLANS.clear()
        plan = ops.make_plan(T, K, K if T > 1 else (K + 7) // 8 * 8, x.dtype, x.device.index or 0, p.values,
                             p.columns, p.meta, None, 64, 8, R)
        assert plan.cfg.name == other
        y_table = ops._spmm_cuda(x, p.values, p.columns, p.meta, None, 64, 8, R)
        monkeypatch.setenv("VENOM_HF_DISPATCH", "heuristic")
        ops._PLANS.clear()
        y_heur = ops._spmm_cuda(x, p.values, p.columns, p.meta, None, 64, 8, R)
        monkeypatch.delenv("VENOM_HF_DISPATCH")
        ref = x.double() @ vf.unpack(p).double().t()
        for y in (y_table, y_heur):
            assert ((y.double() - ref).norm() / ref.norm()).item() < 3e-3
    dispatch.reload()
    ops._PLANS.clear()


def test_collect_shapes_from_a_checkpoint_folder_presets_and_explicit_shapes(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=1).save_pretrained(
        tmp_path / "tiny")
    args = tune._parse_args(["--model", str(tmp_path / "tiny"), "--preset", "encoder", "--shapes", "256x256",
                             "768x768"])
    shapes = tune.collect_shapes(args)
    got = sorted(shapes.values())
    # each (R, K) once, whoever named it first
    assert got == sorted({(256, 256), (64, 256), (512, 256), (256, 512), (384, 256), (1024, 256),
                          (768, 768), (3072, 768), (768, 3072), (2304, 768)})
    assert shapes["tiny q"] == (256, 256) and "256x256" not in shapes
    with pytest.raises(SystemExit, match="RxK"):
        tune.collect_shapes(tune._parse_args(["--shapes", "4096by4096"]))
    with pytest.raises(SystemExit, match="unknown preset"):
        tune.collect_shapes(tune._parse_args(["--preset", "gpt5"]))
    with pytest.raises(SystemExit, match="cannot read"):
        tune.collect_shapes(tune._parse_args(["--model", str(tmp_path / "missing")]))
