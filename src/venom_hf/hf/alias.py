"""The ``sparsity_config=`` alias of ``from_pretrained``.

``AutoModel*.from_pretrained(path, sparsity_config=VNMConfig(...))`` is translated to
``quantization_config=``. transformers v5 gives every Auto class its own copy of ``from_pretrained``, so
``PreTrainedModel`` *and* every ``_BaseAutoModelClass`` subclass are wrapped (idempotently). Auto classes
defined after the alias is enabled (e.g. by remote code) are picked up by calling
``enable_sparsity_config_alias()`` again. ``VENOM_HF_NO_ALIAS=1`` keeps ``import venom_hf`` from installing
it; ``disable_sparsity_config_alias()`` removes it.
"""

from __future__ import annotations

import functools
import os

__all__ = ["enable_sparsity_config_alias", "disable_sparsity_config_alias", "ENV_NO_ALIAS"]

ENV_NO_ALIAS = "VENOM_HF_NO_ALIAS"
_MARK = "_venom_alias"
_wrapped: list[tuple[type, object]] = []  # (owner class, original __dict__ entry)


def _to_config(value):
    from .config import VNMConfig

    if isinstance(value, VNMConfig):
        return value
    if isinstance(value, str):
        return VNMConfig(spec=value)
    if isinstance(value, dict):
        return VNMConfig.from_dict(value)
    raise TypeError(f"sparsity_config must be a VNMConfig, a dict or a spec string like '64:2:8', "
                    f"got {type(value).__name__}")


def _translate(kwargs: dict) -> dict:
    if "sparsity_config" in kwargs:
        sc = kwargs.pop("sparsity_config")
        if sc is not None:
            if kwargs.get("quantization_config") is not None:
                raise ValueError("pass either sparsity_config= or quantization_config= to from_pretrained, not "
                                 "both (sparsity_config is an alias of quantization_config=VNMConfig(...))")
            kwargs["quantization_config"] = _to_config(sc)
    return kwargs


def _wrap(owner: type) -> None:
    raw = owner.__dict__.get("from_pretrained")
    if raw is None:
        return
    func = getattr(raw, "__func__", None)
    if func is None or getattr(func, _MARK, False):
        return

    @functools.wraps(func)
    def from_pretrained(cls, *args, **kwargs):
        return func(cls, *args, **_translate(kwargs))

    setattr(from_pretrained, _MARK, True)
    owner.from_pretrained = classmethod(from_pretrained)
    _wrapped.append((owner, raw))


def _auto_classes():
    import transformers.models.auto.modeling_auto  # noqa: F401  (defines the Auto classes)
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    seen, todo = [], list(_BaseAutoModelClass.__subclasses__())
    while todo:
        c = todo.pop()
        if c not in seen:
            seen.append(c)
            todo.extend(c.__subclasses__())
    return seen


def enable_sparsity_config_alias() -> None:
    """Install the alias on ``PreTrainedModel.from_pretrained`` and every Auto class (idempotent)."""
    from transformers import PreTrainedModel

    _wrap(PreTrainedModel)
    for cls in _auto_classes():
        _wrap(cls)


def disable_sparsity_config_alias() -> None:
    """Remove the alias everywhere it was installed (idempotent)."""
    while _wrapped:
        owner, raw = _wrapped.pop()
        current = owner.__dict__.get("from_pretrained")
        if current is not None and getattr(getattr(current, "__func__", None), _MARK, False):
            owner.from_pretrained = raw


def alias_disabled_by_env() -> bool:
    return os.environ.get(ENV_NO_ALIAS, "").strip().lower() not in ("", "0", "false", "no")
