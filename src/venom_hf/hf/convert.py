"""Module selection and in-place module swaps shared by the quantizer and ``compress``: which modules a config
sparsifies, replacing a module, the packed-checkpoint marker, VNM layers -> ``nn.Linear``."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..format import VNMSpec
from ..modules import VNMMaskedLinear, VNMSparseLinear
from .config import VNMConfig

__all__ = ["plan_modules", "replace_module", "default_skips", "dequantize_modules", "mark_packed", "PACKED_MARKER"]

logger = logging.getLogger("venom_hf")

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def default_skips(model: nn.Module) -> set[str]:
    """Module names transformers advises never to convert: tied weights, output embeddings, last module,
    plus ``_keep_in_fp32_modules``."""
    skips: set[str] = set()
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        skips.update(get_keys_to_not_convert(model))
    except Exception as e:  # noqa: BLE001 - a helper whose internals move between versions
        logger.debug("venom_hf: get_keys_to_not_convert failed (%s); using lm_head only", e)
        out = getattr(model, "get_output_embeddings", lambda: None)()
        skips.update(n for n, m in model.named_modules() if out is not None and m is out)
    skips.update(getattr(model, "_keep_in_fp32_modules", None) or [])
    return skips


def _is_skipped(name: str, skips: set[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skips)


def plan_modules(model: nn.Module, config: VNMConfig, warn: bool = True) -> dict[str, VNMSpec]:
    """``{module name: spec}`` of the modules that ``config`` sparsifies. A targeted module that cannot be
    converted (not an ``nn.Linear`` or not floating point) stays as it is, with one warning naming it."""
    skips = default_skips(model)
    plan: dict[str, VNMSpec] = {}
    for name, module in model.named_modules():
        if not name or not config.is_target(name) or _is_skipped(name, skips):
            continue
        spec = config.spec_for(name)
        if spec is None:
            continue
        if isinstance(module, (VNMMaskedLinear, VNMSparseLinear)):
            plan[name] = module.spec
            continue
        if type(module) is not nn.Linear or module.weight.dtype not in _FLOAT:
            if warn and (isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False))):
                logger.warning(
                    "venom_hf: module %r (%s) matches the targets but is not a floating-point nn.Linear; "
                    "it is left dense", name, type(module).__name__,
                )
            continue
        plan[name] = spec
    return plan


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    new._vnm_name = name


# A 1-byte persistent buffer on the first packed layer of a model (so it travels with that layer under a
# device map). Plain transformers (without venom_hf) does not know quant_method "venom", loads nothing
# into the packed layers and lists this key as UNEXPECTED in its load report, next to the MISSING
# weights: the name says what to do.
PACKED_MARKER = "venom_hf_packed_weights_require_import_venom_hf"


def mark_packed(model: nn.Module, module_name: str | None = None, device=None) -> None:
    """Put the marker on ``module_name`` (default: the first ``VNMSparseLinear``) unless one exists."""
    if any(PACKED_MARKER in m._buffers for m in model.modules()):
        return
    if module_name is None:
        module_name = next((n for n, m in model.named_modules() if isinstance(m, VNMSparseLinear)), None)
        if module_name is None:
            return
    module = model.get_submodule(module_name)
    if device is None:
        device = module.weight_values.device if isinstance(module, VNMSparseLinear) else torch.device("cpu")
        if device.type == "meta":  # offloaded layer: the marker is a resident buffer
            device = torch.device("cpu")
    module.register_buffer(PACKED_MARKER, torch.ones(1, dtype=torch.uint8, device=device), persistent=True)


def unmark_packed(model: nn.Module) -> None:
    for m in model.modules():
        m._buffers.pop(PACKED_MARKER, None)


def dequantize_modules(model: nn.Module) -> int:
    """Replace every VNM layer by a plain ``nn.Linear`` (zeros at pruned positions); returns the count."""
    unmark_packed(model)
    n = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, (VNMMaskedLinear, VNMSparseLinear)):
            replace_module(model, name, module.to_linear())
            n += 1
    return n
