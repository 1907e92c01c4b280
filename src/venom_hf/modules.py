"""V:N:M layers: ``VNMMaskedLinear`` (training) and ``VNMSparseLinear`` (packed inference).

* ``VNMMaskedLinear`` is an ``nn.Linear`` whose dense ``weight`` is multiplied by a V:N:M mask in
  ``forward``: pruned entries are exactly zero in the output and in ``weight.grad``. The mask is kept
  bit-packed (1 bit per weight) in the non-persistent buffer ``mask_bits``, so a state dict (and a
  ``"dense"`` checkpoint) holds only the zeros-baked weight, which any plain ``nn.Linear`` can load.
* ``VNMSparseLinear`` holds the canonical packed tensors of ``docs/format.md`` under their on-disk names
  ``weight_values`` / ``weight_columns`` / ``weight_meta`` (all ``nn.Parameter(requires_grad=False)``, so
  accelerate offloads them like any weight) and runs ``venom_hf.kernels.spmm``.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .format import (
    PackedVNM,
    VNMFormatError,
    VNMSpec,
    check_mask,
    make_mask,
    mask_from_weight,
    pack,
    packed_shapes,
    unpack_tensors,
    validate_tensors,
)
from .kernels import spmm  # venom::spmm: the Spatha kernel on CUDA, the reference elsewhere

__all__ = ["VNMMaskedLinear", "VNMSparseLinear", "pack_mask_bits", "unpack_mask_bits"]

logger = logging.getLogger("venom_hf")

def _bit_shifts(device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def pack_mask_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool (R, K) -> uint8 (R, ceil(K/8)); bit j of byte c is column 8*c + j (little bit order)."""
    R, K = mask.shape
    k8 = math.ceil(K / 8)
    m = F.pad(mask.to(torch.uint8), (0, k8 * 8 - K)).view(R, k8, 8)
    return (m << _bit_shifts(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_mask_bits(bits: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 (R, ceil(K/8)) -> bool (R, K); the inverse of ``pack_mask_bits``."""
    R, k8 = bits.shape
    return ((bits[..., None] >> _bit_shifts(bits.device)) & 1).view(R, k8 * 8)[:, :in_features].bool()


def _is_meta(t: torch.Tensor | None) -> bool:
    return t is not None and t.device.type == "meta"


# --------------------------------------------------------------------------------------------- masked
class VNMMaskedLinear(nn.Linear):
    """Dense ``nn.Linear`` with a V:N:M mask applied in ``forward`` (``F.linear(x, weight * mask, bias)``).

    * ``spec``: the module's ``VNMSpec`` (may be V:N:M with N > 2 during a gradual schedule).
    * ``mask``: the bool (out_features, in_features) mask, unpacked from the bit-packed ``mask_bits`` buffer.
    * ``set_mask(mask, spec=None)``: replace the mask (validated against the spec) and zero the weight
      outside it. A pruning callback should also zero the optimizer moments at newly pruned positions.

    The mask is a non-persistent buffer: state dicts carry only the zeros-baked weight. After
    ``load_state_dict`` (or a load by transformers, which fills non-persistent buffers with garbage) the
    mask is re-derived from the weight's zeros (``format.mask_from_weight``) at the next forward unless
    ``set_mask`` is called first.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        spec: VNMSpec | str = "64:2:8",
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._spec = VNMSpec.parse(spec)
        self.register_buffer(
            "mask_bits",
            torch.zeros(out_features, math.ceil(in_features / 8), dtype=torch.uint8, device=device),
            persistent=False,
        )
        self.mask_ready = False
        if not _is_meta(self.weight):
            self.set_mask(make_mask(self.weight, self._spec), check=False)
        self._register_load_state_dict_pre_hook(self._on_load_state_dict)

    # -- mask access ------------------------------------------------------------------------------
    @property
    def spec(self) -> VNMSpec:
        return self._spec

    @property
    def mask(self) -> torch.Tensor:
        """The bool (out_features, in_features) mask (a fresh tensor; modify it through ``set_mask``)."""
        self._ensure_mask()
        return unpack_mask_bits(self.mask_bits, self.in_features)

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor, spec: VNMSpec | str | None = None, *, check: bool = True,
                 bake: bool = True) -> None:
        """Install ``mask`` (bool, weight-shaped). ``spec`` replaces the module's spec (gradual schedules);
        ``check`` validates the V:N:M structure; ``bake`` zeroes the weight outside the mask."""
        spec = self._spec if spec is None else VNMSpec.parse(spec)
        if tuple(mask.shape) != (self.out_features, self.in_features):
            raise VNMFormatError(
                f"mask shape {tuple(mask.shape)} != weight shape {(self.out_features, self.in_features)}"
            )
        mask = mask.to(torch.bool)
        if check:
            check_mask(mask, spec)
        self._spec = spec
        self._set_mask_bits(pack_mask_bits(mask))
        if bake and not _is_meta(self.weight):
            self.weight.mul_(mask.to(self.weight.device))

    def _set_mask_bits(self, bits: torch.Tensor) -> None:
        """Install an already-validated bit-packed mask (used by the loader)."""
        device = self.mask_bits.device if not _is_meta(self.mask_bits) else bits.device
        self.mask_bits = bits.to(device)
        self.mask_ready = True

    @torch.no_grad()
    def _ensure_mask(self) -> None:
        if self.mask_ready:
            return
        if _is_meta(self.weight):
            raise RuntimeError("VNMMaskedLinear: the weight is on the meta device; load it before using the mask")
        try:
            mask = mask_from_weight(self.weight, self._spec)
        except VNMFormatError as e:
            raise VNMFormatError(
                f"{self._name_for_errors()}: cannot derive the {self._spec} mask from the weight's zeros: {e}"
            ) from None
        self._set_mask_bits(pack_mask_bits(mask))

    def _name_for_errors(self) -> str:
        return getattr(self, "_vnm_name", None) or f"VNMMaskedLinear({self.in_features}->{self.out_features})"

    def _on_load_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "weight" in state_dict:
            self.mask_ready = False  # re-derived from the loaded zeros at the next use

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._ensure_mask()
        mask = unpack_mask_bits(self.mask_bits, self.in_features)
        if mask.device != self.weight.device:
            mask = mask.to(self.weight.device)
        return F.linear(x, self.weight * mask, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, spec={self._spec}"

    # -- conversions ------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, spec: VNMSpec | str = "64:2:8", mask: torch.Tensor | None = None,
                    scores: torch.Tensor | None = None) -> "VNMMaskedLinear":
        """Wrap ``linear``'s parameters (shared, not copied: the weight is zeroed in place outside the mask).
        ``mask`` defaults to ``make_mask(weight, spec, scores)`` (magnitude when ``scores`` is None)."""
        spec = VNMSpec.parse(spec)
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, spec=spec,
                  device="meta", dtype=w.dtype)
        new.weight = w
        new.bias = linear.bias
        new.mask_bits = torch.zeros_like(new.mask_bits, device=w.device)
        if not _is_meta(w):
            new.set_mask(make_mask(w, spec, scores) if mask is None else mask)
        return new

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this module's parameters, with the zeros baked in."""
        if not _is_meta(self.weight):
            self.weight.mul_(self.mask.to(self.weight.device))
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                        dtype=self.weight.dtype)
        lin.weight = self.weight
        lin.bias = self.bias
        return lin


# --------------------------------------------------------------------------------------------- packed
class VNMSparseLinear(nn.Module):
    """Inference layer holding a V:2:M weight in the canonical packed layout (docs/format.md).

    Registered tensors (names and shapes exactly as on disk, from ``format.packed_shapes``):
    ``weight_values`` (Rp, Gp, 2) weight dtype, ``weight_columns`` (Rb, Gp, 4) uint8, ``weight_meta``
    (Rp, Gp) uint8, all ``nn.Parameter(requires_grad=False)``; and ``bias`` (out_features,) or None.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, spec: VNMSpec | str = "64:2:8",
                 device=None, dtype=None):
        super().__init__()
        spec = VNMSpec.parse(spec)
        if not spec.packable:
            raise VNMFormatError(f"VNMSparseLinear needs a V:2:M spec (mma.sp runs 2:4), got {spec}")
        self.in_features, self.out_features, self._spec = in_features, out_features, spec
        shapes = packed_shapes(out_features, in_features, spec)
        dtype = dtype or torch.get_default_dtype()
        self.weight_values = nn.Parameter(torch.zeros(shapes["values"], dtype=dtype, device=device),
                                          requires_grad=False)
        cols = torch.empty(shapes["columns"], dtype=torch.uint8, device=device)
        meta = torch.empty(shapes["meta"], dtype=torch.uint8, device=device)
        if cols.device.type != "meta":  # an all-zero weight in the format's padding form
            cols.copy_(torch.arange(4, dtype=torch.uint8, device=cols.device).expand_as(cols))
            meta.fill_(0b0100)
        self.weight_columns = nn.Parameter(cols, requires_grad=False)
        self.weight_meta = nn.Parameter(meta, requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self._needs_validation = False

    @property
    def spec(self) -> VNMSpec:
        return self._spec

    @property
    def packed(self) -> PackedVNM:
        return PackedVNM(self.weight_values, self.weight_columns, self.weight_meta,
                         (self.out_features, self.in_features), self._spec)

    def validate(self, prefix: str = "") -> None:
        """Check the packed tensors (shapes, dtypes, index ranges, padding); errors name the tensor."""
        validate_tensors(self.weight_values, self.weight_columns, self.weight_meta,
                         (self.out_features, self.in_features), self._spec, prefix=prefix or "weight_")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._needs_validation:  # deferred for offloaded tensors: they are materialized only now
            name = getattr(self, "_vnm_name", "")
            self.validate(f"{name}.weight_" if name else "")
            self._needs_validation = False
        return spmm(x, self.weight_values, self.weight_columns, self.weight_meta, self.bias,
                           self._spec.v, self._spec.m, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, spec={self._spec}")

    # -- conversions ------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, spec: VNMSpec | str = "64:2:8",
                    mask: torch.Tensor | None = None) -> "VNMSparseLinear":
        """Pack ``linear`` (``mask`` defaults to the magnitude mask of ``spec``); the bias is shared."""
        spec = VNMSpec.parse(spec)
        p = pack(linear.weight.detach(), spec, mask)
        new = cls(linear.in_features, linear.out_features, bias=False, spec=spec, device="meta",
                  dtype=linear.weight.dtype)
        new.weight_values = nn.Parameter(p.values, requires_grad=False)
        new.weight_columns = nn.Parameter(p.columns, requires_grad=False)
        new.weight_meta = nn.Parameter(p.meta, requires_grad=False)
        new.bias = linear.bias
        return new

    @classmethod
    def from_masked(cls, masked: VNMMaskedLinear) -> "VNMSparseLinear":
        """Pack a ``VNMMaskedLinear`` with its own mask and spec (which must be V:2:M)."""
        return cls.from_linear(masked, masked.spec, masked.mask)

    @torch.no_grad()
    def to_dense_weight(self) -> torch.Tensor:
        return unpack_tensors(self.weight_values, self.weight_columns, self.weight_meta,
                              (self.out_features, self.in_features), self._spec)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the unpacked weight (zeros at pruned positions); the bias is shared."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                        dtype=self.weight_values.dtype)
        lin.weight = nn.Parameter(self.to_dense_weight().contiguous())
        lin.bias = self.bias
        return lin

    def to_masked(self) -> VNMMaskedLinear:
        """A trainable ``VNMMaskedLinear`` with this layer's weight; the mask is derived from its zeros."""
        lin = self.to_linear()
        new = VNMMaskedLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, spec=self._spec,
                              device="meta", dtype=lin.weight.dtype)
        new.weight, new.bias = lin.weight, lin.bias
        new.mask_bits = torch.zeros_like(new.mask_bits, device=lin.weight.device)
        new.set_mask(mask_from_weight(lin.weight, self._spec), check=False, bake=False)
        return new
