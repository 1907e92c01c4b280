"""The example notebooks: they match their generator (examples/build_notebooks.py) and execute without error
at VENOM_HF_NB_SIZE=small through nbclient, printing their key results."""

from __future__ import annotations

import importlib.util
import os

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def _builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", os.path.join(EXAMPLES, "build_notebooks.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _execute(name, monkeypatch, cwd=EXAMPLES, **env):
    from nbclient import NotebookClient

    monkeypatch.setenv("VENOM_HF_NB_SIZE", "small")
    monkeypatch.setenv("PYTHONPATH", os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with open(os.path.join(EXAMPLES, name)) as f:
        nb = nbformat.read(f, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": cwd}}).execute()
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", f"{name}: {out.get('ename')}: {out.get('evalue')}"
            text.append(out.get("text", "") or out.get("data", {}).get("text/plain", ""))
            images += "image/png" in out.get("data", {})
    return "\n".join(text), images


def test_notebooks_match_their_generator():
    b = _builder()
    for key, (name, cells) in b.NOTEBOOKS.items():
        with open(os.path.join(EXAMPLES, name)) as f:
            nb = nbformat.read(f, as_version=4)
        assert [c.source for c in nb.cells] == [src for _, src in cells], \
            f"{name} differs from examples/build_notebooks.py: rebuild it (python examples/build_notebooks.py)"
        nbformat.validate(nb)


def test_01_prune_during_finetuning(monkeypatch):
    text, images = _execute("01_prune_during_finetuning.ipynb", monkeypatch)
    assert "size: small" in text
    assert "pruning steps: [" in text and "64:2:8" in text
    assert "final: dense accuracy" in text and "at sparsity 0.750" in text
    assert images >= 1  # accuracy and sparsity curves


@pytest.mark.slow  # ~2.5 min on 2 busy CPU cores (SmolLM2-135M loaded three times, OBS on one block)
def test_02_sparse_llm_inference(monkeypatch):
    text, images = _execute("02_sparse_llm_inference.ipynb", monkeypatch)
    assert "VNMMaskedLinear layers" in text
    assert "perplexity on Persuasion" in text
    assert "packed layers after reload: 7" in text  # small size: OBS on the first block's 7 Linears
    assert "final: sparse/dense decode speed" in text


def test_03_kernel_benchmarks(monkeypatch):
    text, images = _execute("03_kernel_benchmarks.ipynb", monkeypatch)
    assert "final: plotted" in text and "spmm" in text
    assert images >= 1


def test_03_without_benchmark_json_says_what_to_do(monkeypatch, tmp_path):
    text, images = _execute("03_kernel_benchmarks.ipynb", monkeypatch, cwd=str(tmp_path),
                            VENOM_HF_SPMM_JSON=str(tmp_path / "missing.json"))
    assert "No SpMM benchmark JSON found" in text and "venom-hf bench kernel" in text
    assert images == 0
