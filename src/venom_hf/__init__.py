"""venom_hf: V:N:M (VENOM) sparsity for Hugging Face Transformers.

``import venom_hf`` registers the ``"venom"`` quantization method with transformers and installs the
``sparsity_config=`` alias of ``from_pretrained`` (disable with ``VENOM_HF_NO_ALIAS=1`` or
``venom_hf.disable_sparsity_config_alias()``).
"""

from __future__ import annotations

import importlib

from .format import PackedVNM, VNMFormatError, VNMSpec, make_mask, pack, unpack, validate, vnm_linear

__version__ = "0.1.0"

# name -> submodule that defines it; imported on first use so that `import venom_hf` stays light.
_LAZY = {
    "spmm": "venom_hf.kernels",
    "VNMMaskedLinear": "venom_hf.modules",
    "VNMSparseLinear": "venom_hf.modules",
    "fuse_projections": "venom_hf.modules",
    "unfuse_projections": "venom_hf.modules",
    "VNMConfig": "venom_hf.hf",
    "VNMHfQuantizer": "venom_hf.hf",
    "compress": "venom_hf.hf",
    "defer_stop_check": "venom_hf.hf",
    "enable_sparsity_config_alias": "venom_hf.hf",
    "disable_sparsity_config_alias": "venom_hf.hf",
    "VNMPruningCallback": "venom_hf.pruning",
    "prune": "venom_hf.pruning",
}

__all__ = ["VNMSpec", "VNMFormatError", "PackedVNM", "make_mask", "pack", "unpack", "validate", "vnm_linear", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'venom_hf' has no attribute {name!r}")


def _register_with_transformers() -> None:
    # Registration must happen at import so that from_pretrained(..., quantization_config=VNMConfig(...))
    # and loading a saved venom checkpoint work after a plain `import venom_hf`.
    try:
        hf = importlib.import_module("venom_hf.hf")
    except ModuleNotFoundError as e:  # the HF layer is optional only while it is being built
        if e.name != "venom_hf.hf":
            raise
        return
    hf.register()


_register_with_transformers()
