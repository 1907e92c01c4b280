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
import os
import weakref

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
from .kernels import ops as _ops

__all__ = ["VNMMaskedLinear", "VNMSparseLinear", "fuse_projections", "unfuse_projections", "pack_mask_bits",
           "unpack_mask_bits"]

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


# -- input checks and the eager launch fast path ---------------------------------------------------
def _check_layer_input(x, weight: torch.Tensor, in_features: int, layer) -> None:
    """nn.Linear's input checks with errors that name the layer (kernels.ops.check_input); under autocast
    the dtype is autocast's business, as for nn.Linear."""
    autocast = isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)
    _ops.check_input(x, weight, in_features, layer, match_dtype=not autocast)


def _dispatch_modes_active() -> bool:
    f = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return f is not None and f() > 0


# Eager decode issues hundreds of small SpMMs per token, so the host time of one call is what an eager
# `generate()` sees. A plan cache per weight (layer or fused group) keyed by the input's shape and dtype
# holds the kernel's launch plan (config, grid, argument structs with the weight pointers); a hit costs a
# few dictionary and pointer checks, one output allocation and one ctypes launch, with none of the custom
# op's dispatch. Anything unusual (tracing, autograd, tensor subclasses, dispatch modes, misaligned or
# strided inputs, moved weights) takes the op, which gives the same result.
_MAX_PLANS = 16


def _weight_identity(values, columns, meta, bias) -> tuple:
    """What a cached plan was made for: the weight tensors' addresses and the in-place versions of the
    tensors its derived layouts come from (columns, meta)."""
    return (values.data_ptr(), columns.data_ptr(), meta.data_ptr(), 0 if bias is None else bias.data_ptr(),
            _ops.tensor_version(columns), _ops.tensor_version(meta))


def _fast_spmm(plans: dict, x: torch.Tensor, values, columns, meta, bias):
    """The output through a cached launch plan, or None when the call must take the op."""
    entry = plans.get((x.shape, x.dtype))
    if entry is None:
        return None
    plan, made_for, out_shape = entry
    idx = plan.idx
    if (x.get_device() != idx or type(x) is not torch.Tensor or x.requires_grad or not x.is_contiguous()
            or x.data_ptr() % 16 or torch.cuda.current_device() != idx or _dispatch_modes_active()):
        return None
    if _weight_identity(values, columns, meta, bias) != made_for:
        return None
    return plan.run(x.data_ptr(), torch._C._cuda_getCurrentRawStream(idx), out_shape)


def _remember_plan(plans: dict, x: torch.Tensor, values, columns, meta, bias, v: int, m: int, R: int) -> None:
    """Make and cache the launch plan of this call when the fast path can serve its like."""
    if type(x) is not torch.Tensor or not x.is_cuda or not x.is_contiguous() or x.data_ptr() % 16 or x.numel() == 0:
        return
    K = x.shape[-1]
    T = x.numel() // K
    if T > 1 and K % 8:
        return
    if bias is not None and bias.dtype != x.dtype:
        return
    tensors = (values, columns, meta) + (() if bias is None else (bias,))
    if any(not t.is_contiguous() or t.data_ptr() % 16 for t in tensors):
        return
    if not _ops._cuda_supported(x, values, columns, meta, bias, v, m, R):
        return
    idx = x.get_device()
    if torch.cuda.current_device() != idx:
        return
    plan = _ops.make_plan(T, K, K if T > 1 else (K + 7) // 8 * 8, x.dtype, idx, values, columns, meta, bias, v, m, R,
                          os.environ.get("VENOM_HF_SPMM_CONFIG") or None)
    if plan is None or plan.provisional:  # a capture's stand-in: the next eager call makes the real plan
        return
    if len(plans) >= _MAX_PLANS:  # e.g. many prompt lengths: start over rather than grow
        plans.clear()
    plans[(x.shape, x.dtype)] = (plan, _weight_identity(values, columns, meta, bias), (*x.shape[:-1], R))


def _eager_fast_path_allowed(x) -> bool:
    return not torch.compiler.is_compiling() and type(x) is torch.Tensor


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
        # the unbound function + with_module: torch keeps a weak reference to the module, where a bound
        # method would make a reference cycle that keeps replaced (e.g. packed) layers alive until gc
        self._register_load_state_dict_pre_hook(VNMMaskedLinear._on_load_state_dict, with_module=True)

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
        _check_layer_input(x, self.weight, self.in_features, self._name_for_errors)
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
        self._vm = (spec.v, spec.m)
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
        self._fused_group: "_FusedProjections | None" = None

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
        group = getattr(self, "_fused_group", None)  # getattr: layers pickled before fusion existed
        if group is not None and not torch.compiler.is_compiling():
            if type(x) is torch.Tensor and x.is_inference():
                # an inference tensor (torch.inference_mode) has no version counter: an in-place change
                # between two siblings' calls could not be seen, so each member runs alone
                group = None
            else:
                # the eager fast path of a fused member: a sibling already ran the group's SpMM for this very
                # tensor (its slice is all that is left), or the group has a launch plan for this input's shape
                y = group.eager_output(self, x)
                if y is not None:
                    return y
        # Traced through an intact group, the layer reads the group's tensors only: every tensor, object and
        # attribute a trace reads is a guard that the compiled graph checks on the host at every call (a
        # fused member's own views are three tensor guards each, ~500 on a 32-layer model, for nothing).
        traced_group = group is not None and torch.compiler.is_compiling() and group._intact_at_trace()
        if traced_group:
            weight = group.values
        else:
            params = self._parameters
            values, columns, meta, bias = params["weight_values"], params["weight_columns"], params["weight_meta"], \
                params.get("bias")
            fast = _eager_fast_path_allowed(x)
            if fast and group is None:
                y = _fast_spmm(self._plans, x, values, columns, meta, bias)
                if y is not None:
                    return y
            weight = values
        _check_layer_input(x, weight, self.in_features, self._name_for_errors)
        if x.dtype != weight.dtype:  # autocast: the kernel runs in the weight's dtype
            x = x.to(weight.dtype)
        if traced_group:
            return group.traced_output_for(self, x)
        if group is not None and not torch.compiler.is_compiling():
            y = group.output_for(self, x)
            if y is not None:
                return y
        # v and m as the layer's own ints, not through the spec object: the layers of a model share one spec,
        # and an object reached from two modules costs the compiled graph an identity guard in Python per use
        v, m = self._vm
        if fast:
            _remember_plan(self._plans, x, values, columns, meta, bias, v, m, self.out_features)
        return spmm(x, values, columns, meta, bias, v, m, self.out_features)

    def _name_for_errors(self) -> str:
        name = getattr(self, "_vnm_name", None)
        return f"VNMSparseLinear({name})" if name else \
            f"VNMSparseLinear(in_features={self.in_features}, out_features={self.out_features})"

    @property
    def _plans(self) -> dict:
        plans = self.__dict__.get("_plan_cache")
        if plans is None:  # layers made before plans existed (pickles), and deep copies (see __deepcopy__)
            plans = self.__dict__["_plan_cache"] = {}
        return plans

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_plan_cache", None)  # launch plans hold device pointers: never copied or pickled
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_vm" not in self.__dict__:  # layers pickled before the ints existed
            self._vm = (self._spec.v, self._spec.m)

    def extra_repr(self) -> str:
        group = getattr(self, "_fused_group", None)
        fused = f", fused_with={group.names}" if group is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, spec={self._spec}{fused}")

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


# -- sibling projections in one launch -------------------------------------------------------------
# Attention's q/k/v and the MLP's gate/up read the same input. At decode each of them is a small,
# memory-bound SpMM whose launch and ramp-up/tail cost as much as a good part of its weight stream, so
# running the siblings as one SpMM over their row-concatenated weights (one launch, 2-3x the rows to
# spread over the SMs) is the cheapest speed-up there is. The packed format makes this a plain concat:
# every member's rows are padded to whole V-row blocks, so row blocks never straddle two members.

#: sibling names that read the same input in the transformers model families (Llama/Mistral/Qwen/
#: SmolLM-style attention and gated MLPs, BERT-style self-attention)
FUSABLE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
)


def _split_sizes(out_features: list[int], rows: list[int]) -> tuple[list[int], list[int]]:
    """(sizes along the rows of a group's output, index of each member's part): a member's padding rows
    (out_features not a multiple of V) are parts of their own."""
    sizes, part_of = [], []
    for n, r in zip(out_features, rows):
        part_of.append(len(sizes))
        sizes.append(n)
        if r > n:
            sizes.append(r - n)
    return sizes, part_of


def _group_tensor(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class _FusedProjections:
    """Owns the row-concatenated packed tensors of sibling ``VNMSparseLinear`` layers.

    The members' parameters become views into these tensors (no second copy). The first member called
    with an input runs one SpMM for all of them and the others get their slice of that output, as long
    as they are called with the *same* tensor (identity and version counter); anything else - another
    input, an in-place change - takes the member's own, unfused path, so the result is always that of the
    member alone. After ``model.to(...)`` (the members' tensors no longer live in the fused storage) the
    group concatenates them again at the next eager call; members that cannot be fused any more (spread
    over devices, offloaded) run unfused.
    """

    def __init__(self, members: list[VNMSparseLinear], names: tuple[str, ...]):
        self.names = names
        # weak: members point to the group, and a cycle would keep a deleted model's weights until gc
        self._members = [weakref.ref(m) for m in members]
        self._build(members)
        self._x = None
        self._traced_x = self._traced_y = None
        self._traced_served = 0
        self._x_version = -1
        self._served = 0
        self._warned = False

    @torch.no_grad()
    def _build(self, members: list[VNMSparseLinear]) -> None:
        m0 = members[0]
        self.spec = m0.spec
        self.vm = (self.spec.v, self.spec.m)  # ints for the trace (see VNMSparseLinear.forward)
        rows = [m.weight_values.shape[0] for m in members]  # Rp of each member: whole V-row blocks
        self.row_offsets = [sum(rows[:i]) for i in range(len(rows))]
        self.rows = sum(rows)
        # nn.Parameter, registered on no module (not in parameters() or the state dict): torch.compile keeps
        # Parameters static, in address and in shape, wherever it meets them. Plain tensors reached through
        # this object are so only in the first graph of a forward: when a second model (other group shapes)
        # or batch size compiles it again, dynamo's automatic dynamic shapes make their sizes symbolic and
        # CUDA-graph trees take them as non-static inputs, handled on the host at every replay (~200 on a
        # Llama-3-8B step, with up to ~0.9 ms more GPU idle per step; docs/perf-notes.md).
        self.values = _group_tensor(torch.cat([m.weight_values for m in members]))
        self.columns = _group_tensor(torch.cat([m.weight_columns for m in members]))
        self.meta = _group_tensor(torch.cat([m.weight_meta for m in members]))
        self.bias = None
        if any(m.bias is not None for m in members):
            parts = []
            for m, r in zip(members, rows):
                part = self.values.new_zeros(r)
                if m.bias is not None:
                    part[: m.out_features] = m.bias.detach().to(self.values.dtype)
                parts.append(part)
            self.bias = _group_tensor(torch.cat(parts))
        v = self.spec.v
        for i, (m, off, r) in enumerate(zip(members, self.row_offsets, rows)):
            m.weight_values = nn.Parameter(self.values[off : off + r], requires_grad=False)
            m.weight_columns = nn.Parameter(self.columns[off // v : (off + r) // v], requires_grad=False)
            m.weight_meta = nn.Parameter(self.meta[off : off + r], requires_grad=False)
            if m.bias is not None:
                m.bias = nn.Parameter(self.bias[off : off + m.out_features], requires_grad=m.bias.requires_grad)
            m._fused_group, m._fused_index = self, i
        self._views = [self._pointers(m) for m in members]
        # the group's output split into its members' slices by one op (a narrow per member costs a
        # dispatcher call each): the sizes along the rows, with the padding rows of a member whose
        # out_features is not a multiple of V as parts of their own
        self._part_sizes, self._part_of = _split_sizes([m.out_features for m in members], rows)
        self._parts = ()
        self._plans: dict = {}

    @property
    def members(self) -> list[VNMSparseLinear]:
        return [r() for r in self._members]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_plans"] = {}  # launch plans hold device pointers and a lock: never copied or pickled
        state["_x"], state["_parts"] = None, ()  # an output kept for the siblings is not state
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "vm" not in state:  # groups pickled before the ints existed
            self.vm = (self.spec.v, self.spec.m)

    @staticmethod
    def _pointers(m: VNMSparseLinear) -> tuple:
        p = m._parameters
        b = p.get("bias")
        return (p["weight_values"].data_ptr(), p["weight_columns"].data_ptr(), p["weight_meta"].data_ptr(),
                None if b is None else b.data_ptr())

    def intact(self) -> bool:
        """False once a member's tensors no longer live in the fused storage (``.to()``, reassignment)."""
        for ref, want in zip(self._members, self._views):  # per new input at decode: no list of members
            m = ref()
            if m is None or self._pointers(m) != want:
                return False
        return True

    def _rebuild(self) -> bool:
        """Concatenate the members' current tensors again (after ``.to()``); False when they cannot be."""
        members = self.members
        if any(m is None or m._fused_group is not self for m in members) or not _fusable(members):
            return False
        self._build(members)
        return True

    def _spmm_all(self, x: torch.Tensor) -> torch.Tensor:
        """The one SpMM of the group: every member's rows (each member's output is a slice of it)."""
        if _eager_fast_path_allowed(x):
            y = _fast_spmm(self._plans, x, self.values, self.columns, self.meta, self.bias)
            if y is not None:
                return y
            _remember_plan(self._plans, x, self.values, self.columns, self.meta, self.bias, *self.vm, self.rows)
        v, m = self.vm
        return spmm(x, self.values, self.columns, self.meta, self.bias, v, m, self.rows)

    def output_for(self, member: VNMSparseLinear, x: torch.Tensor) -> torch.Tensor | None:
        """Run the group's one SpMM for a new input ``x`` and return ``member``'s slice; None when the members
        no longer live in one storage and cannot be fused again (the caller runs the member alone). The
        siblings then take their slices through ``eager_output``."""
        # checked once per input, not per member (this runs per layer at decode)
        if not self.intact() and not self._rebuild():
            if not self._warned:
                logger.warning("venom_hf: fused projections %s can no longer share one storage (moved to "
                               "different devices or offloaded); running them unfused", self.names)
                self._warned = True
            self._x, self._parts = None, ()
            return None
        return self._serve(self._spmm_all(x), x, member)

    def eager_output(self, member: VNMSparseLinear, x) -> torch.Tensor | None:
        """``member``'s slice without the checks of a new input, or None (the caller takes the checked path):
        when the group's last SpMM ran for this same tensor, unchanged since (identity and version counter),
        or, for a new input, through the group's launch plan for its shape and dtype (made by a checked call
        of that shape, so the checks hold) while the members still live in the fused storage."""
        if self._x is x and self._x_version == x._version:
            return self._slice(member)
        if not self._plans or type(x) is not torch.Tensor or not self.intact():
            return None
        y = _fast_spmm(self._plans, x, self.values, self.columns, self.meta, self.bias)
        if y is None:
            return None
        return self._serve(y, x, member)

    def _serve(self, y: torch.Tensor, x: torch.Tensor, member: VNMSparseLinear) -> torch.Tensor:
        """Keep the group's output ``y`` of input ``x`` for the siblings, and return ``member``'s slice."""
        self._parts = y.split_with_sizes(self._part_sizes, -1)
        self._x, self._x_version, self._served = x, x._version, 0
        return self._slice(member)

    def _slice(self, member: VNMSparseLinear) -> torch.Tensor:
        y = self._parts[self._part_of[member._fused_index]]
        self._served += 1
        if self._served >= len(self._members):  # every member has its slice: drop the references
            self._x, self._parts = None, ()
        return y

    @torch.compiler.assume_constant_result
    def _intact_at_trace(self) -> bool:
        return self.intact()

    def traced_output_for(self, member: VNMSparseLinear, x: torch.Tensor) -> torch.Tensor:
        """The fused path while dynamo traces (``torch.compile``): inductor does not merge repeated custom-op
        calls, so the trace itself must call the SpMM once per input. Within one traced graph the same
        input is the same traced value, so identity is the whole check (the version counter and pointers
        of the eager path do not exist there). Whether the members still live in the fused storage is
        decided by the caller, once, when the graph is traced (``_intact_at_trace``: moved and not yet
        re-fused by an eager call, the members trace unfused)."""
        if self._traced_x is not x:
            self._traced_y = self._spmm_all(x)
            self._traced_x, self._traced_served = x, 0
        off = self.row_offsets[member._fused_index]
        y = self._traced_y[..., off : off + member.out_features]
        self._traced_served += 1
        if self._traced_served >= len(self._members):
            # back to the state the trace started from: dynamo replays these attribute writes after each
            # call, and a left-over tensor would change the guards (a re-compile) and keep the output alive
            self._traced_x = self._traced_y = None
        return y

    def release(self) -> None:
        """Give each member its own contiguous tensors again and detach it from the group."""
        for m in self.members:
            if m is not None:
                _detach_from_group(m)
        self._members = []
        self._x, self._parts = None, ()
        self._plans = {}


def _fusable(members: list[VNMSparseLinear]) -> bool:
    """Same spec, width, dtype and device, resident (offloaded layers - meta, or an accelerate hook that swaps
    the weights in per forward - keep their own tensors: a fused copy would pin them on the device)."""
    m0 = members[0]
    if any(_is_meta(m.weight_values) or getattr(getattr(m, "_hf_hook", None), "offload", False) for m in members):
        return False
    return all(m.spec == m0.spec and m.in_features == m0.in_features
               and m.weight_values.dtype == m0.weight_values.dtype
               and m.weight_values.device == m0.weight_values.device
               and m.weight_values.shape[1] == m0.weight_values.shape[1] for m in members)


def _detach_from_group(m: VNMSparseLinear) -> None:
    """Give ``m`` contiguous tensors of its own (not views of a fused storage) and no group."""
    m.weight_values = nn.Parameter(m.weight_values.detach().clone(), requires_grad=False)
    m.weight_columns = nn.Parameter(m.weight_columns.detach().clone(), requires_grad=False)
    m.weight_meta = nn.Parameter(m.weight_meta.detach().clone(), requires_grad=False)
    if m.bias is not None:
        m.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
    m._fused_group = None


def _clone_fused_state(module, state_dict, prefix, local_metadata):
    # The members' tensors are views of one storage; safetensors refuses shared storage, so a state dict
    # (what save_pretrained writes) gets its own copies.
    if getattr(module, "_fused_group", None) is None:
        return state_dict
    for name in ("weight_values", "weight_columns", "weight_meta", "bias"):
        t = state_dict.get(prefix + name)
        if t is not None:
            state_dict[prefix + name] = t.detach().clone()
    return state_dict


def fuse_projections(model: nn.Module, groups: tuple[tuple[str, ...], ...] = FUSABLE_GROUPS) -> int:
    """Run sibling ``VNMSparseLinear`` layers that read the same input (q/k/v, gate/up) as one SpMM.

    Looks under every module for children named as in one of ``groups`` that are all packed with the
    same spec, ``in_features``, dtype and device, and fuses them (a group with a missing or dense member
    is left alone). Memory does not grow: the members' parameters become views of the concatenation.
    The forward results are the same as unfused (each member's rows of one larger SpMM); state dicts
    and ``save_pretrained`` write the members' own tensors as before. Under ``torch.compile`` the trace
    holds one SpMM per group too. Loading a packed checkpoint and ``venom_hf.compress`` call this already;
    after ``model.to(...)`` a group re-fuses itself at its next eager call. Returns the number of groups fused.
    """
    fused = 0
    for parent in model.modules():
        for names in groups:
            members = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, VNMSparseLinear) for m in members):
                continue
            if any(getattr(m, "_fused_group", None) is not None for m in members):
                g = getattr(members[0], "_fused_group", None)
                if g is not None and g.members == members and g.intact():
                    continue  # already fused (a deep copy's members are not the group's: it is re-fused)
                for m in members:
                    g = getattr(m, "_fused_group", None)
                    if g is None:
                        continue
                    if any(x is m for x in g.members):
                        g.release()  # this model's own stale group: all its members get their tensors back
                    else:
                        _detach_from_group(m)  # a deep copy's reference to the original model's group
            if not _fusable(members):
                continue
            _FusedProjections(members, names)
            for m in members:
                if not getattr(m, "_vnm_fused_hook", False):
                    m._register_state_dict_hook(_clone_fused_state)
                    m._vnm_fused_hook = True
            fused += 1
    return fused


def unfuse_projections(model: nn.Module) -> int:
    """Undo ``fuse_projections``: every member gets its own tensors back. Returns the number of groups."""
    groups = {}
    for m in model.modules():
        g = getattr(m, "_fused_group", None) if isinstance(m, VNMSparseLinear) else None
        if g is None:
            continue
        if any(x is m for x in g.members):
            groups[id(g)] = g
        else:  # a deep copy's reference to the original model's group: leave the original alone
            _detach_from_group(m)
    for g in groups.values():
        g.release()
    return len(groups)
