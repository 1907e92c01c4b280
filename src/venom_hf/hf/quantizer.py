"""``VNMHfQuantizer``: the transformers v5 quantizer plugin for ``quant_method="venom"``.

Only hooks that are stable from transformers 5.17 to 5.24 are overridden (see
shared/docs/hf-integration-notes.md §1.3): validate_environment, update_dtype,
_process_model_before_weight_loading, param_needs_quantization, get_quantize_ops, param_element_size,
_process_model_after_weight_loading, is_serializable, is_trainable, is_qat_trainable, is_compileable,
get_state_dict_and_metadata, _dequantize.

Loading paths:

* dense checkpoint + ``VNMConfig`` (not pre-quantized): targets become ``VNMMaskedLinear`` (format "dense")
  or ``VNMSparseLinear`` (format "packed"); the quantize op derives the magnitude mask of each weight as it
  is read, returning the zeros-baked weight (dense) or the packed tensors (packed), so disk offload stores
  the final tensors.
* venom "dense" checkpoint (pre-quantized): ``VNMMaskedLinear``; masks are re-derived from the zeros
  (``format.mask_from_weight``) after loading, or at the first forward for offloaded layers.
* venom "packed" checkpoint: ``VNMSparseLinear`` whose tensors have the on-disk names and shapes; the
  safetensors headers are checked before loading and the tensors validated after it.
"""

from __future__ import annotations

import json
import logging
import os
import struct

import torch
import torch.nn as nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer

from ..format import VNMFormatError, VNMSpec, make_mask, mask_from_weight, pack, packed_shapes
from ..modules import VNMMaskedLinear, VNMSparseLinear, fuse_projections, pack_mask_bits
from .config import VNMConfig
from .convert import PACKED_MARKER, dequantize_modules, mark_packed, plan_modules, replace_module
from .generation import defer_stop_check

__all__ = ["VNMHfQuantizer"]

logger = logging.getLogger("venom_hf")

_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                       "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
                       "I64": torch.int64, "BOOL": torch.bool}
_PACKED = ("weight_values", "weight_columns", "weight_meta")


def _read_safetensors_header(path: str) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100_000_000:
            raise VNMFormatError(f"{path}: safetensors header of {n} bytes is not plausible")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


class _VNMQuantizeOp(ConversionOps):
    """On-the-fly op for a dense checkpoint: weight -> zeros-baked weight (+ mask) or packed tensors."""

    def __init__(self, quantizer: "VNMHfQuantizer"):
        self.quantizer = quantizer

    def convert(self, input_dict, source_patterns=None, target_patterns=None, **kwargs):
        out = {}
        for key, value in input_dict.items():
            tensor = value[0] if isinstance(value, (list, tuple)) else value
            out.update(self.quantizer._convert_dense_weight(key, tensor))
        return out


class VNMHfQuantizer(HfQuantizer):
    """transformers quantizer plugin for V:N:M sparsity (``quant_method="venom"``)."""

    requires_calibration = False

    def __init__(self, quantization_config: VNMConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.dtype = None
        self._kinds: dict[str, str] = {}  # module name -> "masked" | "packed" (replaced before loading)
        self._specs: dict[str, VNMSpec] = {}
        self._pending_masks: dict[str, torch.Tensor] = {}  # module name -> mask bits from the quantize op
        self._failed: dict[str, str] = {}  # module name -> reason (left dense)
        self._marker_on_disk: str | None = None  # module holding the packed marker in the checkpoint

    # -- environment ------------------------------------------------------------------------------
    def validate_environment(self, *args, **kwargs):
        if not isinstance(self.quantization_config, VNMConfig):
            raise TypeError(f"VNMHfQuantizer needs a VNMConfig, got {type(self.quantization_config).__name__}")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from transformers.integrations import is_deepspeed_zero3_enabled

            if is_deepspeed_zero3_enabled():
                raise ValueError("venom_hf does not support DeepSpeed ZeRO-3 yet")

    def update_dtype(self, dtype):
        self.dtype = dtype
        return dtype

    # -- before loading -----------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        cfg: VNMConfig = self.quantization_config
        plan = plan_modules(model, cfg)
        on_disk = self._packed_on_disk(model, plan, checkpoint_files) if self.pre_quantized else None
        self._kinds.clear()
        self._specs = dict(plan)
        for name, spec in plan.items():
            old = model.get_submodule(name)
            if isinstance(old, (VNMMaskedLinear, VNMSparseLinear)):
                continue
            if self.pre_quantized and on_disk is not None:
                kind = "packed" if name in on_disk else "masked"
            else:
                kind = "packed" if cfg.format == "packed" else "masked"
            if kind == "packed" and not spec.packable:
                logger.warning("venom_hf: %r has spec %s (N != 2), which has no packed form; it stays masked",
                               name, spec)
                kind = "masked"
            w = old.weight
            cls = VNMSparseLinear if kind == "packed" else VNMMaskedLinear
            new = cls(old.in_features, old.out_features, bias=old.bias is not None, spec=spec, device=w.device,
                      dtype=w.dtype)
            if kind == "packed" and not self.pre_quantized:
                # the dense checkpoint key must exist for the loader; the quantize op replaces it by a
                # 0-element placeholder that is dropped after loading
                new.weight = nn.Parameter(torch.empty_like(w), requires_grad=False)
            replace_module(model, name, new)
            self._kinds[name] = kind
        if self._marker_on_disk in self._kinds:  # loaded from the checkpoint; otherwise added after loading
            mark_packed(model, self._marker_on_disk, device=torch.device("meta"))
        return model

    def _packed_on_disk(self, model, plan, checkpoint_files) -> set[str] | None:
        """Names of the planned modules stored packed, from the safetensors headers (None: unknown).
        Raises VNMFormatError naming the tensor when a packed tensor has the wrong shape or dtype."""
        files = [f for f in (checkpoint_files or []) if isinstance(f, str) and f.endswith(".safetensors")]
        if not files:
            return None
        headers = {}
        for f in files:
            if os.path.isfile(f):
                headers.update(_read_safetensors_header(f))
        marker = next((k for k in headers if k.endswith("." + PACKED_MARKER)), None)
        marker_module = marker.rpartition(".")[0] if marker else None
        prefix = getattr(model, "base_model_prefix", "") or ""
        by_module: dict[str, dict[str, dict]] = {}
        for key, info in headers.items():
            module, _, param = key.rpartition(".")
            if param not in _PACKED:
                continue
            for cand in (module, f"{prefix}.{module}" if prefix else module,
                         module.removeprefix(prefix + ".") if prefix else module):
                if cand in plan:
                    if module == marker_module:
                        self._marker_on_disk = cand
                    by_module.setdefault(cand, {})[param] = info
                    break
            else:
                logger.warning("venom_hf: packed tensor %r does not belong to a targeted module; it is ignored", key)
        for name, tensors in by_module.items():
            spec = plan[name]
            mod = model.get_submodule(name)
            want = packed_shapes(mod.out_features, mod.in_features, spec)
            for param in _PACKED:
                t = f"{name}.{param}"
                if param not in tensors:
                    raise VNMFormatError(f"{t}: missing from the checkpoint (the other packed tensors of {name!r} "
                                         f"are present)")
                shape = tuple(tensors[param].get("shape", ()))
                if shape != want[param.removeprefix("weight_")]:
                    raise VNMFormatError(
                        f"{t}: shape {shape} does not match a {mod.out_features}x{mod.in_features} weight in "
                        f"{spec} (expected {want[param.removeprefix('weight_')]})")
                dtype = _SAFETENSORS_DTYPES.get(tensors[param].get("dtype"))
                if param == "weight_values":
                    ok = dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
                else:
                    ok = dtype == torch.uint8
                if not ok:
                    raise VNMFormatError(f"{t}: dtype {tensors[param].get('dtype')} is not allowed "
                                         f"({'a float dtype' if param == 'weight_values' else 'U8'} expected)")
        return set(by_module)

    # -- on-the-fly conversion of a dense checkpoint -------------------------------------------------
    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module, _, param = param_name.rpartition(".")
        # "weight" routes the dense checkpoint tensor through the quantize op; the packed names only
        # matter for set_param_for_module's shape check (a layer left dense gets 0-element placeholders)
        return module in self._kinds and (param == "weight" or param in _PACKED)

    def get_quantize_ops(self):
        return _VNMQuantizeOp(self)

    def param_element_size(self, model, param_name: str, param: torch.Tensor) -> float:
        module, _, p = param_name.rpartition(".")
        if p == "weight" and self._kinds.get(module) == "packed":
            return 0.0  # placeholder of a dense checkpoint key; the packed tensors are counted themselves
        return param.element_size()

    @torch.no_grad()
    def _convert_dense_weight(self, key: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        module, _, param = key.rpartition(".")
        kind = self._kinds.get(module)
        if param != "weight" or kind is None:
            return {key: weight}
        spec = self._specs[module]
        try:
            mask = make_mask(weight, spec)
            if kind == "packed":
                p = pack(weight, spec, mask)
                return {f"{module}.weight_values": p.values, f"{module}.weight_columns": p.columns,
                        f"{module}.weight_meta": p.meta, key: weight.new_empty(0)}
        except VNMFormatError as e:
            self._failed[module] = str(e)
            out = {key: weight}
            if kind == "packed":  # fill the packed slots so that nothing is reported MISSING
                out.update({f"{module}.{p}": torch.empty(0, dtype=weight.dtype if p == "weight_values" else
                                                         torch.uint8, device=weight.device) for p in _PACKED})
            return out
        self._pending_masks[module] = pack_mask_bits(mask).cpu()
        return {key: torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))}

    # -- after loading -------------------------------------------------------------------------------
    @torch.no_grad()
    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, reason in list(self._failed.items()):
            module = model.get_submodule(name)
            w = getattr(module, "weight", None)
            if w is None or w.device.type == "meta" or w.numel() == 0:
                raise VNMFormatError(f"{name}: cannot be sparsified ({reason}) and cannot be left dense")
            logger.warning("venom_hf: %r cannot be sparsified (%s); it is left dense", name, reason)
            lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta",
                            dtype=w.dtype)
            lin.weight = nn.Parameter(w.detach(), requires_grad=True)
            lin.bias = module.bias
            replace_module(model, name, lin)
            self._kinds.pop(name, None)
        for name, module in model.named_modules():
            if isinstance(module, VNMMaskedLinear):
                module._vnm_name = name
                bits = self._pending_masks.pop(name, None)
                if bits is not None:
                    module._set_mask_bits(bits)
                elif module.weight.device.type != "meta":
                    try:
                        mask = mask_from_weight(module.weight, module.spec)
                    except VNMFormatError as e:
                        raise VNMFormatError(
                            f"{name}.weight is not {module.spec}-sparse although the checkpoint says so ({e}). "
                            "Was it modified outside venom_hf? Remove quantization_config from config.json and "
                            "load it with quantization_config=VNMConfig(...) to prune it again") from None
                    module._set_mask_bits(pack_mask_bits(mask))
                else:
                    module.mask_ready = False  # offloaded: derived from the zeros at the first forward
            elif isinstance(module, VNMSparseLinear):
                module._vnm_name = name
                if "weight" in module._parameters:
                    del module._parameters["weight"]  # placeholder of the dense checkpoint key
                if module.weight_values.device.type != "meta" and module.weight_meta.device.type != "meta":
                    module.validate(f"{name}.weight_")
                else:
                    module._needs_validation = True
        if any(isinstance(m, VNMSparseLinear) for m in model.modules()):
            mark_packed(model)
            # inference layers read their siblings' input: q|k|v and gate|up run as one SpMM each (the state
            # dict and save_pretrained are unchanged; offloaded layers are left unfused)
            fuse_projections(model)
            defer_stop_check(model)  # the shorter decode step must not wait for the host (hf/generation.py)
        self._pending_masks.clear()
        self._failed.clear()
        return model

    # -- flags ------------------------------------------------------------------------------------
    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        # venom::spmm is a torch.library custom op with a fake implementation, and the fused projections
        # keep no tensor across calls under tracing: transformers may compile the forward (static cache)
        return True

    # -- saving / dequantizing ------------------------------------------------------------------------
    @torch.no_grad()
    def get_state_dict_and_metadata(self, model):
        # "dense" checkpoints must hold exact zeros outside the masks (a vanilla nn.Linear reads them as
        # they are); weights edited in place outside the mask are re-baked (forward already ignores them).
        for module in model.modules():
            if isinstance(module, VNMMaskedLinear) and module.weight.device.type != "meta" and module.mask_ready:
                module.weight.mul_(module.mask.to(module.weight.device))
        return None, {}

    def _dequantize(self, model, dtype=None):
        dequantize_modules(model)
        return model


def _ensure_quantizer(model: nn.Module, config: VNMConfig) -> None:
    """Give a model built outside ``from_pretrained`` (pruned or packed in memory) the config and quantizer
    attributes that ``save_pretrained`` and ``dequantize`` read."""
    cfg = getattr(model, "config", None)
    if cfg is not None and not isinstance(getattr(cfg, "quantization_config", None), VNMConfig):
        cfg.quantization_config = config
    if getattr(model, "hf_quantizer", None) is None:
        model.hf_quantizer = VNMHfQuantizer(config, pre_quantized=True)
        model.is_quantized = True
        model.quantization_method = config.quant_method
        if cfg is not None:
            cfg._is_quantized = True
