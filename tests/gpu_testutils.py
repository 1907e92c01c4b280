"""Shared by the GPU test modules."""

from __future__ import annotations

import pytest
import torch


def skip_module_without_spatha() -> None:
    """Skip the calling test module (at import) unless a CUDA GPU runs the Spatha kernel."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU", allow_module_level=True)
    from venom_hf import kernels

    if not kernels.is_available():
        pytest.skip("Spatha kernel unavailable (compute capability < 8.0 or no NVRTC)", allow_module_level=True)
