"""Spatha V:N:M sparse tensor-core kernels (NVRTC-built at run time) and their torch custom op.

Public API::

    spmm(x, values, columns, meta, bias, v, m, out_features) -> Tensor   # torch.ops.venom.spmm
    is_available(device=None) -> bool

Layering: this package imports venom_hf.format only.
"""

from .ops import choose_config, is_available, require_available, spmm, spmm_reference

__all__ = ["spmm", "is_available", "require_available", "spmm_reference", "choose_config"]
