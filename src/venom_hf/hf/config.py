"""``VNMConfig``: the checkpoint-describing, JSON-only V:N:M config (``quant_method="venom"``).

Every attribute is a JSON value (str, int, list, dict, None); every string that can reach code paths is
checked against a fixed allow-list, so an untrusted ``config.json`` can never select code to import.
"""

from __future__ import annotations

import logging

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..format import VNMFormatError, VNMSpec
from .names import DEFAULT_IGNORE, DEFAULT_TARGETS, check_pattern, check_patterns, matches, selected

__all__ = ["VNMConfig", "DEFAULT_TARGETS", "DEFAULT_IGNORE", "FORMATS", "FORMAT_VERSION"]

logger = logging.getLogger("venom_hf")

QUANT_METHOD = "venom"
FORMAT_VERSION = 1
FORMATS = ("dense", "packed")  # "dense": zeros baked into the weight, no extra tensors; "packed": docs/format.md
MASK_INITS = ("magnitude",)  # how a mask is derived when a dense, not yet sparse checkpoint is loaded

_KNOWN = ("spec", "targets", "ignore", "per_module", "format", "mask_init", "format_version", "quant_method")


class VNMConfig(QuantizationConfigMixin):
    """V:N:M sparsity config, registered with transformers as ``quant_method="venom"``.

    Args:
        spec: the V:N:M pattern counting *kept* weights, e.g. ``"64:2:8"`` (75 % sparse). Stored as a string.
        targets: module names or ``"re:"`` regexes to sparsify; default: the attention and MLP projections of
            Llama/Mistral/Qwen-style decoders and BERT-style encoders (``DEFAULT_TARGETS``; stored explicitly).
        ignore: module names or ``"re:"`` regexes never to sparsify, on top of ``DEFAULT_IGNORE`` (heads,
            classifiers, poolers, embeddings), tied weights and the output embeddings (always skipped).
            Pattern syntax: ``venom_hf.hf.names`` (docs/hf-api.md).
        per_module: ``{name or "re:regex": spec or None}``; the first matching entry overrides ``spec`` for
            that module (``None`` keeps it dense).
        format: ``"dense"`` (zeros baked into ordinary ``weight`` tensors; the checkpoint loads in vanilla
            transformers) or ``"packed"`` (``weight_values``/``weight_columns``/``weight_meta``; needs
            ``import venom_hf`` to load).
        mask_init: how masks are derived when a dense, not yet sparse checkpoint is loaded (``"magnitude"``).
        format_version: the on-disk layout version (``FORMAT_VERSION``). A checkpoint written with a newer
            version raises ``ValueError`` (upgrade venom_hf to load it); ``version`` is read as the same field.

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
        self.format_version = _check_version(format_version, kwargs.pop("version", None))
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
        self.targets = list(DEFAULT_TARGETS) if targets is None else check_patterns(targets, "VNMConfig.targets")
        self.ignore = [] if ignore is None else check_patterns(ignore, "VNMConfig.ignore")
        if per_module is None:
            per_module = {}
        if not isinstance(per_module, dict):
            raise ValueError(f"VNMConfig.per_module must be a dict {{name or 're:regex': spec or None}}, "
                             f"got {per_module!r}")
        self.per_module = {}
        for k, v in per_module.items():
            check_pattern(k, "VNMConfig.per_module")
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
            if matches(name, pattern):
                return None if spec is None else VNMSpec.parse(spec)
        return self.vnm_spec

    def is_target(self, name: str) -> bool:
        """Whether module ``name`` matches ``targets`` and neither ``ignore`` nor ``DEFAULT_IGNORE`` (the same
        rule as ``venom_hf.pruning.find_targets``)."""
        return selected(name, self.targets, self.ignore)

    def to_dict(self):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in super().to_dict().items() if k in _KNOWN}


def _check_version(format_version, version=None) -> int:
    """The checkpoint's layout version, refused when this venom_hf cannot read it. ``version`` is the same field
    under the name a hand-edited or foreign config may use; the newer of the two counts."""
    for v in (format_version, version):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"VNMConfig.format_version must be an int, got {v!r}")
    found = format_version if version is None else max(format_version, version)
    if found > FORMAT_VERSION:
        raise ValueError(
            f"VNMConfig: this checkpoint has format_version {found}, but this venom_hf reads format_version "
            f"{FORMAT_VERSION} at most: it was written by a newer venom_hf. Upgrade venom_hf "
            f"(pip install -U venom_hf) to load it")
    if found < 1:
        raise ValueError(f"VNMConfig.format_version must be >= 1, got {found}")
    return found
