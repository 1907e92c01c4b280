"""``compress``: masked V:N:M layers -> packed ones in place, with the config and quantizer that make
``save_pretrained`` write a packed checkpoint."""

from __future__ import annotations

import logging

import torch.nn as nn

from ..modules import VNMMaskedLinear, VNMSparseLinear
from .config import VNMConfig
from .convert import mark_packed, replace_module
from .generation import defer_stop_check
from .quantizer import _ensure_quantizer

__all__ = ["compress"]

logger = logging.getLogger("venom_hf")


def compress(model: nn.Module, *, progress: bool = True) -> nn.Module:
    """Turn every ``VNMMaskedLinear`` of ``model`` into a ``VNMSparseLinear`` in place (a progress bar runs
    over the layers) and set ``model.config.quantization_config.format = "packed"``, so that
    ``save_pretrained`` writes a packed checkpoint, and turn on ``defer_stop_check`` for ``generate()``. A
    layer that cannot be packed (N > 2, or offloaded to meta/disk) stays masked, with one warning naming it.
    Returns ``model``."""
    from tqdm.auto import tqdm

    names = [n for n, m in model.named_modules() if isinstance(m, VNMMaskedLinear)]
    kept = []
    for name in tqdm(names, desc="venom_hf: packing layers", unit="layer", disable=not progress or not names):
        module = model.get_submodule(name)
        if not module.spec.packable:
            kept.append(name)
            logger.warning("venom_hf: %r has spec %s (N != 2), which has no packed form; it stays masked",
                           name, module.spec)
            continue
        if module.weight.device.type == "meta" or hasattr(module, "_hf_hook"):
            kept.append(name)
            logger.warning("venom_hf: %r is offloaded (accelerate hook / meta weight) and cannot be packed in "
                           "place; load the checkpoint with format='packed' instead. It stays masked", name)
            continue
        replace_module(model, name, VNMSparseLinear.from_masked(module))
    if any(isinstance(m, VNMSparseLinear) for m in model.modules()):
        mark_packed(model)
        defer_stop_check(model)  # the shorter decode step must not wait for the host (hf/generation.py)
    cfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if not isinstance(cfg, VNMConfig):
        if not names:
            logger.warning("venom_hf: compress() found no VNMMaskedLinear layer and no VNMConfig; nothing to do")
            return model
        specs = {model.get_submodule(n).spec for n in names}
        # Name exactly the converted modules: the default targets may cover layers that stayed dense,
        # and a reload would then demand V:N:M structure from them.
        cfg = VNMConfig(spec=str(next(iter(specs))) if len(specs) == 1 else "64:2:8", format="packed",
                        targets=list(names))
        per = {n: str(model.get_submodule(n).spec) for n in names} if len(specs) > 1 else {}
        cfg.per_module.update(per)
    cfg.format = "packed"
    _ensure_quantizer(model, cfg)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.quantization_config = cfg
    return model
