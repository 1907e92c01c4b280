"""``VNMConfig``: the checkpoint-describing, JSON-only V:N:M config (``quant_method="venom"``).

Every attribute is a JSON value (str, int, list, dict, None); every string that can reach code paths is
checked against a fixed allow-list, so an untrusted ``config.json`` can never select code to import.
"""

from __future__ import annotations

import logging
import re

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..format import VNMFormatError, VNMSpec

__all__ = ["VNMConfig", "DEFAULT_TARGETS", "DEFAULT_IGNORE", "FORMATS", "FORMAT_VERSION"]

logger = logging.getLogger("venom_hf")

QUANT_METHOD = "venom"
FORMAT_VERSION = 1
FORMATS = ("dense", "packed")  # "dense": zeros baked into the weight, no extra tensors; "packed": docs/format.md
MASK_INITS = ("magnitude",)  # how a mask is derived when a dense, not yet sparse checkpoint is loaded

# Attention and MLP projections. Plain names match a module whose full name equals the name or ends
# with "." + name; "re:<regex>" patterns are matched against the full module name with re.fullmatch.
DEFAULT_TARGETS = (
    # Llama / Mistral / Qwen / Gemma / Phi-3-style decoders
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    # BERT / RoBERTa-style encoders ("output.dense" does not match "pooler.dense")
    "attention.self.query", "attention.self.key", "attention.self.value",
    "attention.output.dense", "intermediate.dense", "output.dense",
)
# Always skipped on top of what transformers reports (tied weights, output embeddings, the last module).
DEFAULT_IGNORE = ("lm_head", "re:.*embed.*")

_KNOWN = ("spec", "targets", "ignore", "per_module", "format", "mask_init", "format_version", "quant_method")
_MAX_PATTERN_LEN = 512


def _check_patterns(value, field: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"VNMConfig.{field} must be a list of module names or 're:' regexes, got {value!r}")
    out = []
    for p in value:
        _check_pattern(p, field)
        out.append(p)
    return out


def _check_pattern(p, field: str) -> None:
    if not isinstance(p, str) or not p or len(p) > _MAX_PATTERN_LEN:
        raise ValueError(f"VNMConfig.{field}: each entry must be a non-empty string (<= {_MAX_PATTERN_LEN} chars), "
                         f"got {p!r}")
    if p.startswith("re:"):
        try:
            re.compile(p[3:])
        except re.error as e:
            raise ValueError(f"VNMConfig.{field}: invalid regex {p!r}: {e}") from None


def _match(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def match_any(name: str, patterns) -> bool:
    return any(_match(name, p) for p in patterns)


class VNMConfig(QuantizationConfigMixin):
    """V:N:M sparsity config, registered with transformers as ``quant_method="venom"``.

    Args:
        spec: the V:N:M pattern counting *kept* weights, e.g. ``"64:2:8"`` (75 % sparse). Stored as a string.
        targets: module names or ``"re:"`` regexes to sparsify; default: the attention and MLP projections of
            Llama/Mistral/Qwen-style decoders and BERT-style encoders (``DEFAULT_TARGETS``; stored explicitly).
        ignore: module names or ``"re:"`` regexes never to sparsify, on top of ``lm_head``, embeddings, tied
            weights and the output embeddings (always skipped).
        per_module: ``{name or "re:regex": spec or None}``; the first matching entry overrides ``spec`` for
            that module (``None`` keeps it dense).
        format: ``"dense"`` (zeros baked into ordinary ``weight`` tensors; the checkpoint loads in vanilla
            transformers) or ``"packed"`` (``weight_values``/``weight_columns``/``weight_meta``; needs
            ``import venom_hf`` to load).
        mask_init: how masks are derived when a dense, not yet sparse checkpoint is loaded (``"magnitude"``).
        format_version: the on-disk layout version (1).

    Unknown keys (e.g. from a newer venom_hf) are ignored with a warning; invalid values raise ``ValueError``.
    """

    def __init__(
        self,
        spec: str | VNMSpec | tuple = "64:2:8",
        targets: list[str] | None = None,
        ignore: list[str] | None = None,
        per_module: dict[str, str | None] | None = None,
        format: str = "dense",
        mask_init: str = "magnitude",
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **kwargs,
    ):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"VNMConfig: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        self.quant_method = QUANT_METHOD
        if isinstance(format_version, bool) or not isinstance(format_version, int):
            raise ValueError(f"VNMConfig.format_version must be an int, got {format_version!r}")
        if format_version < 1 or format_version > FORMAT_VERSION:
            raise ValueError(
                f"VNMConfig.format_version={format_version} is not supported by this venom_hf (knows 1.."
                f"{FORMAT_VERSION}); the checkpoint was written by a newer venom_hf: upgrade it"
            )
        self.format_version = format_version
        try:
            self.spec = str(VNMSpec.parse(spec))
        except VNMFormatError as e:
            raise ValueError(f"VNMConfig.spec: {e}") from None
        if not isinstance(format, str) or format not in FORMATS:
            raise ValueError(f"VNMConfig.format must be one of {list(FORMATS)}, got {format!r}")
        self.format = format
        if not isinstance(mask_init, str) or mask_init not in MASK_INITS:
            raise ValueError(f"VNMConfig.mask_init must be one of {list(MASK_INITS)}, got {mask_init!r}")
        self.mask_init = mask_init
        self.targets = list(DEFAULT_TARGETS) if targets is None else _check_patterns(targets, "targets")
        self.ignore = [] if ignore is None else _check_patterns(ignore, "ignore")
        if per_module is None:
            per_module = {}
        if not isinstance(per_module, dict):
            raise ValueError(f"VNMConfig.per_module must be a dict {{name or 're:regex': spec or None}}, "
                             f"got {per_module!r}")
        self.per_module = {}
        for k, v in per_module.items():
            _check_pattern(k, "per_module")
            if v is not None:
                try:
                    v = str(VNMSpec.parse(v))
                except VNMFormatError as e:
                    raise ValueError(f"VNMConfig.per_module[{k!r}]: {e}") from None
            self.per_module[k] = v
        if format == "packed" and not VNMSpec.parse(self.spec).packable:
            raise ValueError(f"VNMConfig: format='packed' needs a V:2:M spec (the packed layout and kernel run "
                             f"2:4 inside the kept columns), got spec={self.spec!r}; use format='dense'")
        if kwargs:
            logger.warning("venom_hf: VNMConfig ignores unknown keys %s (written by a newer venom_hf?)",
                           sorted(kwargs))

    # -- derived (not serialized) -----------------------------------------------------------------
    @property
    def vnm_spec(self) -> VNMSpec:
        return VNMSpec.parse(self.spec)

    def spec_for(self, name: str) -> VNMSpec | None:
        """The spec of module ``name`` (``per_module`` first), ``None`` when it must stay dense."""
        for pattern, spec in self.per_module.items():
            if _match(name, pattern):
                return None if spec is None else VNMSpec.parse(spec)
        return self.vnm_spec

    def is_target(self, name: str) -> bool:
        return match_any(name, self.targets) and not match_any(name, self.ignore) and \
            not match_any(name, DEFAULT_IGNORE)

    def to_dict(self):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in super().to_dict().items() if k in _KNOWN}

