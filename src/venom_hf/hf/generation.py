"""``generate()`` without a host stall per token on CUDA: transformers' deferred stop check, extended.

transformers' decoding loop asks, after every token, whether all sequences have finished
(``bool(unfinished_sequences.max() == 0)``). On CUDA that read waits for the device, so the host cannot queue
step t+1 while the GPU runs step t: each decode step costs GPU time *plus* host time. A V:N:M model makes
the GPU part 2-3x shorter and the host part stays, so the stall eats most of the speedup (Llama-3-8B shape,
64:2:16, static cache, batch 1 on an H200: 2.1 ms of GPU work per 3.5 ms step).

transformers ships the cure, ``DeferredStopCheck``: the flag is copied asynchronously and read one step late,
and the one extra forward this can cost is undone. It enables it only on ``mps``. ``defer_stop_check(model)``
turns it on for ``model.generate()`` on CUDA as well, and teaches it to roll back a user-owned
``StaticCache`` of full-attention layers (transformers would refuse it: ``StaticLayer`` has no ``crop``).
Other models and calls keep transformers' own choice. The generated tokens are the same either way; only
the host-device synchronisation changes. ``compress`` and loading a packed checkpoint call it.
"""

from __future__ import annotations

import contextvars
import logging
import types

import torch
import torch.nn as nn

__all__ = ["defer_stop_check", "stop_check_deferred"]

logger = logging.getLogger("venom_hf")

# Set while a model with deferral enabled runs generate(); read by the stop check's is_supported.
_ACTIVE = contextvars.ContextVar("venom_hf_defer_stop_check", default=False)
# Device types the deferral is extended to (transformers itself covers mps).
DEVICE_TYPES = ("cuda",)


def _static_layers(cache):
    """The layers of ``cache`` when all of them are plain full-attention ``StaticLayer`` s, whose rollback is
    moving ``cumulative_length`` back (the stale key/value slots beyond it are masked and later overwritten);
    None otherwise (sliding windows have already overwritten what a rollback would need)."""
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:
        return None
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    if all(type(layer) is StaticLayer and isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
           for layer in layers):
        return list(layers)
    return None


def _install() -> bool:
    """Swap transformers' ``DeferredStopCheck`` for the extended subclass (once). False when this
    transformers has no deferred stop check: ``generate`` then runs its stock loop."""
    try:
        from transformers.generation import utils as gen
    except ImportError:
        return False
    base = getattr(gen, "DeferredStopCheck", None)
    if base is None or not hasattr(base, "is_supported"):
        return False
    if getattr(base, "_venom_hf_extended", False):
        return True

    class VNMDeferredStopCheck(base):
        """transformers' ``DeferredStopCheck``, also on ``DEVICE_TYPES`` while a deferring model generates,
        and with a rollback of user-owned full-attention static caches."""

        _venom_hf_extended = True

        def __init__(self, input_ids, max_length, cache, cache_is_returned, streamer=None):
            self._rollback_layers = None
            if cache is not None and cache_is_returned and not cache.is_croppable:
                self._rollback_layers = _static_layers(cache)
                cache_is_returned = False  # rolled back in finish(): the base class would call crop()
            super().__init__(input_ids, max_length, cache, cache_is_returned, streamer)

        @staticmethod
        def is_supported(device, cache, cache_is_returned, is_assistant) -> bool:
            if base.is_supported(device, cache, cache_is_returned, is_assistant):
                return True
            if not _ACTIVE.get() or device.type not in DEVICE_TYPES or is_assistant:
                return False
            if cache is None or not cache_is_returned or cache.is_croppable:
                return True
            return _static_layers(cache) is not None

        def finish(self) -> int:
            steps = super().finish()
            if steps and self._rollback_layers:
                for layer in self._rollback_layers:
                    if getattr(layer, "is_initialized", True):
                        layer.cumulative_length.sub_(steps)
            return steps

    VNMDeferredStopCheck.__name__ = VNMDeferredStopCheck.__qualname__ = "VNMDeferredStopCheck"
    gen.DeferredStopCheck = VNMDeferredStopCheck
    return True


def _deferring_generate(self, *args, **kwargs):
    token = _ACTIVE.set(True)
    try:
        return type(self).generate(self, *args, **kwargs)
    finally:
        _ACTIVE.reset(token)


def defer_stop_check(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Let ``model.generate()`` read its stop flag one step late on CUDA, so that the host queues the next
    decode step while the GPU runs the current one (see the module docstring). ``enabled=False`` restores
    transformers' stock loop for this model. Models without ``generate`` and transformers versions without
    a deferred stop check are left as they are. Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"defer_stop_check expects a torch.nn.Module, got {type(model).__name__}")
    if not enabled:
        if stop_check_deferred(model):
            del model.__dict__["generate"]
        return model
    if not callable(getattr(type(model), "generate", None)) or stop_check_deferred(model):
        return model
    if not _install():
        logger.debug("venom_hf: this transformers has no DeferredStopCheck; generate() keeps its stock loop")
        return model
    # a bound method (not a closure) so that copy.deepcopy(model) rebinds it to the copy
    model.generate = types.MethodType(_deferring_generate, model)
    return model


def stop_check_deferred(model: nn.Module) -> bool:
    """Whether ``defer_stop_check`` is on for ``model``."""
    g = model.__dict__.get("generate")
    return isinstance(g, types.MethodType) and g.__func__ is _deferring_generate
