"""Module-name patterns: the one syntax for choosing layers, shared by ``VNMConfig`` (``targets``, ``ignore``,
``per_module``), ``venom_hf.pruning.find_targets`` / ``prune`` / ``VNMPruningCallback`` and the CLI.

A pattern is either

* a plain name: matches a module whose full name equals it or ends with ``"." + name``
  (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``; ``"output.dense"`` does not match ``pooler.dense``), or
* ``"re:<regex>"``: the regex must match the *whole* module name (``re.fullmatch``), e.g.
  ``"re:model\\.layers\\.[0-3]\\..*_proj"``.

The whole-name rule is part of the checkpoint format: a saved ``quantization_config`` lists its patterns, and a
reload must select the same modules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["DEFAULT_TARGETS", "DEFAULT_IGNORE", "matches", "match_any", "selected", "check_pattern", "check_patterns"]

# Attention and MLP projections.
DEFAULT_TARGETS = (
    # Llama / Mistral / Qwen / Gemma / Phi-3-style decoders
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    # BERT / RoBERTa-style encoders ("output.dense" does not match "pooler.dense")
    "attention.self.query", "attention.self.key", "attention.self.value",
    "attention.output.dense", "intermediate.dense", "output.dense",
)

# Never sparsified, whatever the targets say: any module with a name component that is an output head, a
# classifier or pooler, or an embedding (lm_head, classifier, pooler, score, qa_outputs, head, GPT-2's wte/wpe,
# and every component containing "embed": embed_tokens, embeddings, patch_embed, ...).
DEFAULT_IGNORE = (r"re:(.*\.)?(lm_head|classifier|pooler|score|qa_outputs|head|wte|wpe|\w*embed\w*)(\..*)?",)

MAX_PATTERN_LEN = 512


def matches(name: str, pattern: str) -> bool:
    """Whether module ``name`` matches one pattern (see the module docstring)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def match_any(name: str, patterns: Iterable[str]) -> bool:
    return any(matches(name, p) for p in patterns)


def selected(name: str, targets: Iterable[str], ignore: Iterable[str] = ()) -> bool:
    """``name`` matches a target and neither ``ignore`` nor :data:`DEFAULT_IGNORE`."""
    return match_any(name, targets) and not match_any(name, ignore) and not match_any(name, DEFAULT_IGNORE)


def check_pattern(p, field: str) -> str:
    """Return ``p`` if it is a valid pattern, else raise ``ValueError`` naming ``field``."""
    if not isinstance(p, str) or not p or len(p) > MAX_PATTERN_LEN:
        raise ValueError(f"{field}: each entry must be a non-empty string (<= {MAX_PATTERN_LEN} chars), got {p!r}")
    if p.startswith("re:"):
        try:
            re.compile(p[3:])
        except re.error as e:
            raise ValueError(f"{field}: invalid regex {p!r}: {e}") from None
    return p


def check_patterns(value, field: str) -> list[str]:
    """A pattern or a list of patterns as a list, validated (``ValueError`` naming ``field``)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{field} must be a list of module names or 're:' regexes, got {value!r}")
    return [check_pattern(p, field) for p in value]
