"""Which Linear layers get pruned, and how a mask is installed on them."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..format import VNMSpec
from ..hf.names import DEFAULT_IGNORE, match_any

__all__ = ["find_targets", "DEFAULT_IGNORE", "install_mask", "set_submodule"]


def _masked_cls():
    try:
        from ..modules import VNMMaskedLinear
    except ImportError:  # pragma: no cover - the module layer is optional
        return None
    return VNMMaskedLinear


def find_targets(model: nn.Module, targets=None, ignore=None) -> dict[str, nn.Linear]:
    """{name: module} of the Linear layers to prune, in registration (usually forward) order.

    ``targets``: None (every ``VNMMaskedLinear`` if the model has some, else every ``nn.Linear``), or a
    list of module names / name suffixes / ``"re:<regex>"`` patterns, the syntax of ``VNMConfig``
    (``venom_hf.hf.names``). Matches of ``ignore`` and of :data:`DEFAULT_IGNORE` (heads, classifiers, poolers,
    embeddings) are removed, also from explicit targets: the same selection as ``VNMConfig.is_target``.
    """
    ignore = () if ignore is None else ([ignore] if isinstance(ignore, str) else tuple(ignore))
    if isinstance(targets, str):
        targets = [targets]
    masked = _masked_cls()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if targets is None:
        if masked is not None and any(isinstance(m, masked) for m in linears.values()):
            linears = {n: m for n, m in linears.items() if isinstance(m, masked)}
    else:
        linears = {n: m for n, m in linears.items() if match_any(n, targets)}
    out = {n: m for n, m in linears.items() if not match_any(n, ignore) and not match_any(n, DEFAULT_IGNORE)}
    if not out:
        raise ValueError(f"no Linear layer to prune (targets={targets}, ignore={list(ignore)} + DEFAULT_IGNORE)")
    return out


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def install_mask(model: nn.Module, name: str, module: nn.Linear, mask: torch.Tensor, spec: VNMSpec,
                 convert: bool = True) -> nn.Linear:
    """Install ``mask`` on the target: ``set_mask`` on a ``VNMMaskedLinear``; a plain ``nn.Linear`` is
    replaced by a ``VNMMaskedLinear`` sharing its Parameters (``convert=True``, optimizer state unaffected)
    or just has its weight zeroed outside the mask. Returns the module now at ``name``."""
    masked = _masked_cls()
    if masked is not None and isinstance(module, masked):
        module.set_mask(mask, spec)
        return module
    if convert and masked is not None:
        new = masked.from_linear(module, spec, mask=mask)
        new._vnm_name = name
        set_submodule(model, name, new)
        return new
    module.weight.mul_(mask.to(module.weight.device, module.weight.dtype))
    return module
