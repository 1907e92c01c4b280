"""Hugging Face transformers integration: ``VNMConfig``, ``VNMHfQuantizer``, ``compress`` and the
``sparsity_config=`` alias. ``register()`` (run by ``import venom_hf``) registers ``quant_method="venom"``.
"""

from __future__ import annotations

import logging

from .alias import alias_disabled_by_env, disable_sparsity_config_alias, enable_sparsity_config_alias
from .config import DEFAULT_TARGETS, VNMConfig
from .generation import defer_stop_check
from .packing import compress
from .quantizer import VNMHfQuantizer

__all__ = [
    "register",
    "VNMConfig",
    "VNMHfQuantizer",
    "compress",
    "defer_stop_check",
    "enable_sparsity_config_alias",
    "disable_sparsity_config_alias",
    "DEFAULT_TARGETS",
]

logger = logging.getLogger("venom_hf")


def _register_one(mapping: dict, name: str, cls: type, decorator) -> None:
    current = mapping.get(name)
    if current is cls:
        return
    if current is None:
        decorator(name)(cls)
    elif getattr(current, "__module__", "").startswith("venom_hf."):
        mapping[name] = cls  # a stale copy of ours (module reloaded)
    else:
        raise RuntimeError(f"quant_method {name!r} is already registered by {current.__module__}.{current.__name__}")


def register(alias: bool | None = None) -> None:
    """Register ``VNMConfig``/``VNMHfQuantizer`` as ``quant_method="venom"`` (idempotent) and install the
    ``sparsity_config=`` alias unless ``alias=False`` or ``VENOM_HF_NO_ALIAS=1``."""
    from transformers.quantizers import register_quantization_config, register_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    _register_one(AUTO_QUANTIZATION_CONFIG_MAPPING, "venom", VNMConfig, register_quantization_config)
    _register_one(AUTO_QUANTIZER_MAPPING, "venom", VNMHfQuantizer, register_quantizer)
    if alias is None:
        alias = not alias_disabled_by_env()
    if alias:
        enable_sparsity_config_alias()
