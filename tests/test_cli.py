"""The `venom-hf` command line: --help of each command, clear errors (exit 2, no traceback), the benchmarks
from an installed wheel, and `prune` + `eval` end to end on tiny models that use the real MiniLM tokenizer and
BBC News data."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from venom_hf import cli

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_cli(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "venom_hf.cli", *argv], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


# -- help ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["demo"], ["prune"], ["eval"], ["bench"]])
def test_help_of_each_command(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: venom-hf")
    for word in {(): ["demo", "prune", "eval", "bench"], ("demo",): ["--spec", "--device", "--calib-samples"],
                 ("prune",): ["--method", "--calib", "--format", "--out"], ("eval",): ["--task", "--data"],
                 ("bench",): ["kernel", "model", "e2e", "multi-gpu", "generate", "CUDA GPU"]}[tuple(command)]:
        assert word in out


def test_console_entry_point_help():
    r = run_cli("--help", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "V:N:M" in r.stdout and "demo" in r.stdout and "bench" in r.stdout


# -- errors -------------------------------------------------------------------------------------------
def test_bad_spec_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        cli.main(["prune", str(tmp_path), "--spec", "64:3", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --spec" in err and "three ints" in err


def test_missing_path_exits_2_without_traceback(tmp_path):
    r = run_cli("eval", str(tmp_path / "nope"), "--task", "ppl", timeout=60)
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_folder_without_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", str(tmp_path), "--task", "ppl"])
    assert e.value.code == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_kernel_without_gpu(capsys):
    assert cli.main(["bench", "kernel", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err


@pytest.mark.parametrize("what,module,word", [("kernel", "spmm", "--cold"), ("model", "models", "--formats"),
                                              ("e2e", "hf_e2e", "--model"), ("multi-gpu", "multi_gpu", "ddp-check")])
def test_bench_help_runs_the_package_module(what, module, word, capsys):
    assert cli.main(["bench", what, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: venom-hf bench {what}") and word in out
    assert cli.BENCHMARKS[what][0] == module


def test_bench_modules_live_in_the_package():
    import importlib

    for module, _ in cli.BENCHMARKS.values():
        if module == "generate" and importlib.util.find_spec("venom_hf.bench.generate") is None:
            continue  # optional here: the CLI names it and says so when it is missing
        assert callable(importlib.import_module(f"venom_hf.bench.{module}").main)
    assert not os.path.exists(os.path.join(os.path.dirname(SRC), "benchmarks"))


def _copy_source(dst):
    import shutil

    root = os.path.dirname(SRC)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(root, name), dst / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(os.path.join(root, "csrc"), dst / "csrc", ignore=ignore)
    shutil.copytree(os.path.join(root, "src"), dst / "src", symlinks=True, ignore=ignore)


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None,
                    reason="building the wheel offline (--no-build-isolation) needs setuptools in this environment")
def test_wheel_runs_the_cli_without_the_repository(tmp_path):
    """`pip wheel` of the project, installed alone into a folder: the CLI and its benchmarks run from there
    (cwd outside the checkout, no src/ on the path) and the kernel sources ship as package data."""
    import zipfile

    src = tmp_path / "src_copy"
    src.mkdir()
    _copy_source(src)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("venom_hf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "venom_hf/bench/spmm.py" in names and "venom_hf/demo/assets.py" in names
    assert "venom_hf/csrc/spatha.cuh" in names and not any(n.startswith("benchmarks/") for n in names)
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                        str(wheel)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {**ENV, "PYTHONPATH": str(site)}

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "venom_hf.cli", *argv], capture_output=True, text=True, env=env,
                              cwd=str(tmp_path), timeout=120)

    r = run("bench", "kernel", "--help")
    assert r.returncode == 0 and "usage: venom-hf bench kernel" in r.stdout and "--cold" in r.stdout, r.stderr
    r = run("demo", "--help")
    assert r.returncode == 0 and "--spec" in r.stdout, r.stderr
    where = subprocess.run([sys.executable, "-c", "import venom_hf.bench.spmm as m; print(m.__file__)"],
                           capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120).stdout
    assert where.startswith(str(site)), where


# -- end to end on tiny models --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from venom_hf.demo import assets

    return AutoTokenizer.from_pretrained(assets.minilm_path())


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, minilm_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    d = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    minilm_tokenizer.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from venom_hf.demo import assets

    p = tmp_path_factory.mktemp("text") / "news.txt"
    p.write_text("\n\n".join(assets.bbc_news()["test"]["text"][:20]))
    return str(p)


def _linear_types(model):
    return {type(m).__name__ for n, m in model.named_modules() if n.endswith(("_proj",))}


def test_prune_obs_packed_then_eval_ppl(tiny_llama_dir, text_file, tmp_path, capsys):
    import venom_hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    from venom_hf.format import check_mask

    out = tmp_path / "packed"
    rc = cli.main(["prune", tiny_llama_dir, "--spec", "4:2:8", "--method", "obs", "--calib", "bbc",
                   "--calib-samples", "8", "--seq-len", "32", "--out", str(out), "--format", "packed",
                   "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "pruned 14 Linear layers to 4:2:8: sparsity 0.7500" in printed
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "venom" and qc["format"] == "packed" and qc["spec"] == "4:2:8"
    assert (out / "tokenizer.json").exists()

    model = AutoModelForCausalLM.from_pretrained(out)
    assert _linear_types(model) == {"VNMSparseLinear"}
    for n, m in model.named_modules():
        if type(m).__name__ == "VNMSparseLinear":
            check_mask(m.to_linear().weight != 0, "4:2:8")  # at most the V:N:M pattern survives packing

    res = tmp_path / "ppl.json"
    rc = cli.main(["eval", str(out), "--task", "ppl", "--data", text_file, "--window", "64", "--max-tokens", "512",
                   "--device", "cpu", "--json", str(res)])
    assert rc == 0
    r = json.loads(res.read_text())
    assert r["vnm_layers"] == 14 and abs(r["vnm_sparsity"] - 0.75) < 1e-3
    # random weights: perplexity is finite and about the vocabulary size (30522), not far beyond it
    assert math.isfinite(r["perplexity"]) and 1e3 < r["perplexity"] < 2e5
    assert "perplexity" in capsys.readouterr().out


def test_prune_magnitude_dense_format_with_text_calib_loads_in_plain_linear(tiny_llama_dir, text_file, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "dense"
    rc = cli.main(["prune", tiny_llama_dir, "--spec", "8:2:16", "--method", "magnitude", "--calib", text_file,
                   "--out", str(out), "--format", "dense", "--device", "cpu"])
    assert rc == 0
    sd = load_file(str(out / "model.safetensors"))
    w = sd["model.layers.0.mlp.up_proj.weight"]
    assert abs((w == 0).float().mean().item() - 0.875) < 1e-6  # 8:2:16 keeps 2 of 16
    assert sd["lm_head.weight"].ne(0).all()  # heads stay dense
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "dense"


def test_prune_errors(tiny_llama_dir, tmp_path, capsys):
    # packed needs N = 2
    rc = cli.main(["prune", tiny_llama_dir, "--spec", "4:4:8", "--out", str(tmp_path / "x"), "--format", "packed"])
    assert rc == 2 and "needs a V:2:M spec" in capsys.readouterr().err
    # a non-empty --out is refused without --overwrite
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    rc = cli.main(["prune", tiny_llama_dir, "--out", str(tmp_path / "full"), "--method", "magnitude"])
    assert rc == 2 and "not empty" in capsys.readouterr().err
    # a calibration file that does not exist
    rc = cli.main(["prune", tiny_llama_dir, "--calib", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "y")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_prune_then_eval_accuracy_on_bbc(minilm_tokenizer, tmp_path, capsys):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128, num_labels=5)
    src = tmp_path / "tiny_bert"
    BertForSequenceClassification(cfg).save_pretrained(src)
    minilm_tokenizer.save_pretrained(src)
    # ppl on a classifier is refused
    assert cli.main(["eval", str(src), "--task", "ppl"]) == 2
    assert "needs a causal LM" in capsys.readouterr().err

    out = tmp_path / "pruned"
    assert cli.main(["prune", str(src), "--spec", "16:2:8", "--method", "obs", "--calib-samples", "8",
                     "--seq-len", "32", "--out", str(out), "--device", "cpu"]) == 0
    res = tmp_path / "acc.json"
    assert cli.main(["eval", str(out), "--task", "accuracy", "--max-samples", "24", "--seq-len", "32",
                     "--batch-size", "8", "--device", "cpu", "--json", str(res)]) == 0
    r = json.loads(res.read_text())
    assert r["samples"] == 24 and 0.0 <= r["accuracy"] <= 1.0
    assert r["vnm_layers"] == 12 and abs(r["vnm_sparsity"] - 0.75) < 1e-3  # classifier and pooler stay dense
