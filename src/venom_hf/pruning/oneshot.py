"""One-shot, layer-wise V:N:M pruning with calibration data (SparseGPT / OBS style), for models one cannot
fine-tune.

For every target Linear the layer-wise Hessian ``H = 2 X^T X / n`` of its calibration inputs is collected,
damped by ``damp * mean(diag H)``, and the weight is pruned column group by column group (left to right,
in lazy blocks of ``block_size`` columns) with the Cholesky factor ``U`` of ``H^-1``:

* mask of each M-group: the group's effective Hessian over the not-yet-processed columns is
  ``[U_gg^T U_gg]^-1`` (shared by all rows); every row's OBS cost of keeping each N-subset is computed with
  it and the V x M blocks' column sets are searched exhaustively (``scores.select_keepsets``), exactly as
  in the gradual Fisher path, or with per-element saliency ``w^2 / [U^T U]_ii`` when that is too large;
* weights: SparseGPT's sequential OBS update -- each pruned weight's error ``w / U_ii`` is propagated to the
  columns on its right.

With ``sequential=True`` (default) the model's repeated blocks (the ``nn.ModuleList`` holding the targets)
are processed one after another on the *pruned* outputs of the previous block, as in SparseGPT.
Memory: one ``K x K`` float32 Hessian per target Linear of the current block, plus the calibration hidden
states (``num_batches * batch * seq * hidden`` floats).
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn as nn

from ..format import VNMSpec, make_mask
from .scores import exact_search_feasible, keepset_saliency, select_keepsets
from .targets import find_targets, install_mask

logger = logging.getLogger("venom_hf")

__all__ = ["prune", "prune_layer_obs"]


class _Stop(Exception):
    pass


def _tqdm(it, enabled, **kw):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return it
    return tqdm(it, **kw)


@torch.no_grad()
def _select_group(Wg: torch.Tensor, Ug: torch.Tensor, spec: VNMSpec, selection: str) -> torch.Tensor:
    width = Wg.shape[1]
    exact = selection == "exact" or (selection == "auto" and exact_search_feasible(spec))
    if width == spec.m and exact:
        Uinv = torch.linalg.inv(Ug.double())
        h_eff = Uinv @ Uinv.T  # [U_gg^T U_gg]^-1
        cost = keepset_saliency(Wg, h_eff, spec.n)  # (R, 1, S)
        return select_keepsets(cost, spec, width)
    hinv_diag = (Ug.double() ** 2).sum(0)  # diag(U_gg^T U_gg)
    scores = Wg.double() ** 2 / hinv_diag
    return make_mask(Wg, spec, scores=scores.float())


@torch.no_grad()
def prune_layer_obs(weight: torch.Tensor, hessian: torch.Tensor, spec: VNMSpec | str, damp: float = 0.01,
                    block_size: int = 128, selection: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-wise OBS V:N:M pruning of ``weight`` (R, K) given ``hessian`` (K, K) ~ X^T X.

    Returns ``(new_weight, mask)``: new_weight is exactly zero outside the mask and OBS-compensated inside.
    """
    spec = VNMSpec.parse(spec)
    R, K = weight.shape
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone().to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H.double()))
    U = torch.linalg.cholesky(Hinv, upper=True).float()
    mask = torch.zeros(R, K, dtype=torch.bool, device=W.device)
    m = spec.m
    bs = max(m, (block_size // m) * m)
    for i1 in range(0, K, bs):
        i2 = min(i1 + bs, K)
        cnt = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        mask1 = mask[:, i1:i2]
        for i in range(cnt):
            if i % m == 0:
                j2 = min(i + m, cnt)
                mask1[:, i:j2] = _select_group(W1[:, i:j2], U1[i:j2, i:j2], spec, selection)
            w = W1[:, i]
            d = U1[i, i]
            q = w * mask1[:, i]
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        if i2 < K:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    W = W * mask
    return W.to(weight.dtype), mask


def _block_list(model: nn.Module, targets: dict) -> tuple[str, nn.ModuleList] | None:
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1:
            n = sum(1 for t in targets if t.startswith(name + "."))
            if n > best_n:
                best, best_n = (name, mod), n
    return best


def _prep_batch(batch, device):
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "labels"}
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch.to(device)}
    raise TypeError(f"calibration batches must be dicts of tensors or input_ids tensors, got {type(batch).__name__}")


def _forward(model, batch):
    kw = dict(batch)
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kw.setdefault("use_cache", False)
    return model(**kw)


class _HessianHook:
    def __init__(self, module: nn.Linear):
        k = module.in_features
        self.H = torch.zeros(k, k, dtype=torch.float32, device=module.weight.device)
        self.n = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        n = x.shape[0]
        self.H.mul_(self.n / (self.n + n))
        self.n += n
        x = x * math.sqrt(2.0 / self.n)
        self.H.addmm_(x.T, x)

    def remove(self):
        self.handle.remove()


@torch.no_grad()
def prune(model: nn.Module, dataloader=None, spec: VNMSpec | str = "64:2:8", method: str = "obs", *, targets=None,
          ignore=None, num_batches: int | None = None, damp: float = 0.01, block_size: int = 128,
          sequential: bool = True, selection: str = "auto", convert: bool = True, progress: bool = True) -> dict:
    """Prune ``model``'s target Linears to V:N:M in one shot; returns a report dict.

    Args:
        dataloader: calibration batches (dicts with ``input_ids`` / ``attention_mask`` ..., or input_ids
            tensors); needed for ``method="obs"``. ``num_batches`` caps how many are used.
        method: ``"obs"`` (layer-wise second order with OBS updates) or ``"magnitude"``.
        damp: Hessian damping relative to its mean diagonal (SparseGPT's 1 %).
        block_size: lazy-update block of columns (rounded to a multiple of M).
        sequential: process the repeated blocks in order on the pruned model's activations.
        convert: replace pruned ``nn.Linear`` by ``VNMMaskedLinear`` (else only the zeros are baked).
    """
    spec = VNMSpec.parse(spec)
    if method not in ("obs", "magnitude"):
        raise ValueError(f"method must be 'obs' or 'magnitude', got {method!r}")
    tgt = find_targets(model, targets, ignore)
    t0 = time.perf_counter()
    report = {"spec": str(spec), "method": method, "layers": len(tgt)}
    was_training = model.training
    model.eval()
    try:
        if method == "magnitude":
            for name, mod in _tqdm(list(tgt.items()), progress, desc=f"magnitude {spec}"):
                install_mask(model, name, mod, make_mask(mod.weight, spec), spec, convert=convert)
        else:
            if dataloader is None:
                raise ValueError("method='obs' needs a calibration dataloader")
            batches = []
            for i, b in enumerate(dataloader):
                if num_batches is not None and i >= num_batches:
                    break
                batches.append(b)
            device = next(model.parameters()).device
            batches = [_prep_batch(b, device) for b in batches]
            report["calibration_batches"] = len(batches)
            blocks = _block_list(model, tgt) if sequential else None
            if blocks is None:
                _prune_group(model, tgt, list(tgt), lambda: [_forward(model, b) for b in batches], spec, damp,
                             block_size, selection, convert, progress)
            else:
                _prune_sequential(model, tgt, blocks, batches, spec, damp, block_size, selection, convert, progress)
    finally:
        model.train(was_training)
    tgt = find_targets(model, list(tgt), ignore=())
    total = sum(m.weight.numel() for m in tgt.values())
    zeros = sum(int((m.weight == 0).sum()) for m in tgt.values())
    report.update(sparsity=zeros / total, time_s=time.perf_counter() - t0)
    logger.info("venom_hf: one-shot %s %s on %d layers: sparsity %.4f in %.1f s", method, spec, len(tgt),
                report["sparsity"], report["time_s"])
    return report


def _prune_group(model, tgt, names, run, spec, damp, block_size, selection, convert, progress, bar=None):
    hooks = {n: _HessianHook(tgt[n]) for n in names}
    try:
        run()
    finally:
        for h in hooks.values():
            h.remove()
    for n in names:
        mod = tgt[n]
        new_w, mask = prune_layer_obs(mod.weight, hooks[n].H, spec, damp, block_size, selection)
        mod.weight.copy_(new_w)
        tgt[n] = install_mask(model, n, mod, mask, spec, convert=convert)
        hooks[n].H = None
        if bar is not None:
            bar.set_postfix_str(n[-40:])


def _prune_sequential(model, tgt, blocks, batches, spec, damp, block_size, selection, convert, progress):
    prefix, layers = blocks
    captured = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for b in batches:
            try:
                _forward(model, b)
            except _Stop:
                pass
    finally:
        h.remove()
    inside = set()
    bar = _tqdm(range(len(layers)), progress, desc=f"obs {spec}", unit="block")
    for i in bar:
        layer = layers[i]
        lp = f"{prefix}.{i}." if prefix else f"{i}."
        names = [n for n in tgt if n.startswith(lp)]
        inside.update(names)

        def run():
            for args, kwargs in captured:
                layer(*args, **kwargs)

        if names:
            _prune_group(model, tgt, names, run, spec, damp, block_size, selection, convert, progress,
                         bar if hasattr(bar, "set_postfix_str") else None)
        # outputs of the pruned block feed the next one
        new = []
        for args, kwargs in captured:
            out = layer(*args, **kwargs)
            hs = out[0] if isinstance(out, (tuple, list)) else out
            if args:
                args = (hs, *args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": hs}
            new.append((args, kwargs))
        captured = new
    rest = [n for n in tgt if n not in inside]
    if rest:  # targets outside the repeated blocks: one full pass on the pruned model
        _prune_group(model, tgt, rest, lambda: [_forward(model, b) for b in batches], spec, damp, block_size,
                     selection, convert, progress)
