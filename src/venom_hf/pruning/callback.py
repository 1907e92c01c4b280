"""``VNMPruningCallback``: gradual V:N:M pruning (magnitude or oBERT second order) inside ``Trainer``.

How it hooks into the training loop (transformers 5.17-5.24, ``trainer_callback.py``):

* ``on_train_begin``: finds the target Linears and registers a gradient hook on each weight. The hook runs
  inside ``backward`` -- *before* ``clip_grad_norm_`` -- so it (1) zeroes the gradient of pruned weights
  (they cannot inflate the clipped norm) and (2) feeds the Fisher window: the last ``num_grads``
  micro-batch gradients before each pruning step (with gradient accumulation each micro-batch is one
  sample; the gradients carry the Trainer's 1/accumulation loss scaling).
* ``on_step_end`` at each beta step of the :class:`~venom_hf.pruning.schedule.VNMSchedule`: OBS (or
  magnitude) mask selection, OBS weight update, mask installed (a plain ``nn.Linear`` becomes a
  ``VNMMaskedLinear`` sharing its Parameters), optimizer moments of pruned weights zeroed, a log entry.
* ``on_optimizer_step``: ``weight.mul_(mask)`` -- pruned weights stay exactly 0 through AdamW + weight decay.
* ``on_save`` writes ``vnm_pruning.pt`` (masks + any partial Fisher window) into the checkpoint folder;
  ``on_train_begin`` of a resumed run reads it back, so a resumed run has the same masks and schedule as an
  uninterrupted one. ``state()`` (``ExportableState``) carries the JSON arguments and the log history.
* ``on_train_end``: optional packing via ``venom_hf.hf.compress``.

Distributed data parallel (DDP, ``accelerate launch`` / ``torchrun``; see ``docs/distributed.md``):

* The weight hooks see each rank's *local* micro-batch gradient (they run before DDP's bucket all-reduce, and
  under ``no_sync`` for all but the last micro-batch of an accumulation). Under DDP the hook only stashes that
  gradient; outside ``backward`` (``on_substep_end`` / ``on_pre_optimizer_step``) every Fisher layer's stash is
  all-reduced and divided by the world size -- the same average DDP applies to ``.grad`` -- and that averaged
  sample feeds the Fisher in the same chunks as a single-process run. One Fisher sample is therefore the
  gradient of one *global* micro-batch (world_size x per-device batch), exactly the sample a single process
  with that batch would take, and the Fisher is identical on every rank.
* After each pruning step the masks are verified across ranks (an all-reduced checksum; a clear error if they
  disagree) and the pruned weights are re-broadcast from rank 0 if their checksums differ at all.
* FSDP, DeepSpeed and DTensor-sharded (tensor-parallel) parameters are refused in ``on_train_begin``.
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..format import VNMSpec, make_mask
from .schedule import VNMSchedule
from .scores import EmpiricalBlockFisherInverse, obs_mask, obs_update
from .targets import find_targets, install_mask

logger = logging.getLogger("venom_hf")

__all__ = ["VNMPruningCallback", "DistillationLoss", "STATE_FILE"]

STATE_FILE = "vnm_pruning.pt"


class VNMPruningCallback(TrainerCallback, ExportableState):
    """Gradual V:N:M pruning for ``transformers.Trainer``.

    Args (all JSON-serializable, so ``state()`` can rebuild the callback on resume):
        spec: target V:N:M (e.g. ``"64:2:8"``; ``"1:2:4"`` is classic 2:4).
        end_step: optimizer step of the last pruning step (required).
        start_step: optimizer step of the first pruning step (0 = before training starts).
        init_n: first level N0 (default M - 1); the recipes use 5 for M = 8 and 9 for M = 16.
        num_steps: number of beta steps (default: one per level N0..N); ramp: ``"cubic"`` or ``"linear"``.
        method: ``"obs"`` (empirical-Fisher OBS, oBERT) or ``"magnitude"``.
        num_grads: gradient samples per Fisher (original recipes: 1024); the window is the last
            ``num_grads`` micro-batches before each step, never reaching back past the previous step.
        damp: Fisher damping (original: 1e-7). fisher_block_size: weights per Fisher block of a row
            (default M, exact for the per-group search; the pair-wise recipes used 32). Memory per layer
            ``R*K*fisher_block_size*4`` bytes (logged).
        selection: ``"auto"`` | ``"exact"`` | ``"element"`` (see ``scores.obs_mask``). obs_update: apply the
            OBS weight update.
        targets / ignore: module names, suffixes or ``"re:"`` patterns (see ``targets.find_targets``).
        convert: replace pruned ``nn.Linear`` by ``VNMMaskedLinear`` (Parameters shared).
        pack_at_end: call ``venom_hf.hf.compress(model)`` at train end (only for a final V:2:M).
        save_fisher: include a partial Fisher window in checkpoints (exact resume mid-window; large).
    """

    def __init__(self, spec="64:2:8", end_step: int | None = None, start_step: int = 0, init_n: int | None = None,
                 num_steps: int | None = None, ramp: str = "cubic", method: str = "obs", num_grads: int = 1024,
                 damp: float = 1e-7, fisher_block_size: int | None = None, selection: str = "auto",
                 obs_update: bool = True, targets=None, ignore=None, convert: bool = True,
                 pack_at_end: bool = False, save_fisher: bool = True, history=None):
        if end_step is None:
            raise ValueError("VNMPruningCallback needs end_step (the optimizer step of the last pruning step)")
        if method not in ("obs", "magnitude"):
            raise ValueError(f"method must be 'obs' or 'magnitude', got {method!r}")
        self.spec = VNMSpec.parse(spec)
        self.schedule = VNMSchedule(self.spec, int(start_step), int(end_step), init_n, num_steps, ramp)
        self.method = method
        self.num_grads = int(num_grads)
        self.damp = float(damp)
        self.fisher_block_size = int(fisher_block_size or self.spec.m)
        if self.fisher_block_size % self.spec.m:
            raise ValueError(f"fisher_block_size {self.fisher_block_size} must be a multiple of M={self.spec.m}")
        self.selection = selection
        self.obs_update = bool(obs_update)
        self.targets = None if targets is None else list(targets) if not isinstance(targets, str) else [targets]
        self.ignore = None if ignore is None else list(ignore)
        self.convert = bool(convert)
        self.pack_at_end = bool(pack_at_end)
        self.save_fisher = bool(save_fisher)
        self.history = list(history or [])  # one dict per pruning step (JSON)
        self._reset_runtime()

    def _reset_runtime(self):
        self._model = None
        self._modules: dict[str, nn.Linear] = {}
        self._masks: dict[str, torch.Tensor] = {}
        self._fisher: dict[str, EmpiricalBlockFisherInverse] = {}
        self._buf: dict[str, list] = {}
        self._hooks = []
        self._collect = False
        self._collected = 0
        self._fisher_target = None  # global step the open Fisher window belongs to
        self._last_step = 0
        self._pending_logs: dict = {}
        self._window_time = 0.0
        self._pending: dict[str, list] = {}  # DDP: local (not yet all-reduced) gradient of this micro-batch
        self._world = 1
        self._rank_checks = 0  # DDP: cross-rank mask verifications done (one per pruning step)

    # -- ExportableState ----------------------------------------------------------------------------
    def state(self) -> dict:
        s = self.schedule
        return {
            "args": {
                "spec": str(self.spec), "end_step": s.end_step, "start_step": s.start_step, "init_n": s.init_n,
                "num_steps": s.num_steps, "ramp": s.ramp, "method": self.method, "num_grads": self.num_grads,
                "damp": self.damp, "fisher_block_size": self.fisher_block_size, "selection": self.selection,
                "obs_update": self.obs_update, "targets": self.targets, "ignore": self.ignore,
                "convert": self.convert, "pack_at_end": self.pack_at_end, "save_fisher": self.save_fisher,
                "history": self.history,
            },
            "attributes": {},
        }

    # -- helpers ------------------------------------------------------------------------------------
    def _window_steps(self, accum: int) -> int:
        return max(1, math.ceil(self.num_grads / max(1, accum)))

    def _make_hook(self, name: str):
        def hook(grad):
            mask = self._masks.get(name)
            if mask is not None:
                grad = grad * mask.to(grad.dtype)
            if self._collect and name in self._fisher and self._world > 1:
                # DDP: a local gradient; averaged over the ranks in _sync_pending (outside backward)
                self._pending.setdefault(name, []).append(grad.detach().to(torch.float32).clone())
            elif self._collect and name in self._fisher:
                buf = self._buf.setdefault(name, [])
                buf.append(grad.detach().to(torch.float32).clone())
                if len(buf) >= self.fisher_block_size:
                    t0 = time.perf_counter()
                    self._fisher[name].update(torch.stack(buf))
                    buf.clear()
                    self._window_time += time.perf_counter() - t0
            return grad if mask is not None else None

        return hook

    def _attach(self, model):
        self._model = model
        self._modules = find_targets(model, self.targets, self.ignore)
        for h in self._hooks:
            h.remove()
        self._hooks = [m.weight.register_hook(self._make_hook(n)) for n, m in self._modules.items()]

    def _open_window(self, target_step: int):
        self._fisher = {}
        self._buf = {}
        total = 0
        for n, m in self._modules.items():
            f = EmpiricalBlockFisherInverse(m.weight.shape, self.fisher_block_size, self.damp, self.num_grads,
                                            device=m.weight.device)
            self._fisher[n] = f
            total += f.memory_bytes()
        self._fisher_target = target_step
        self._collected = 0
        self._window_time = 0.0
        logger.info("venom_hf: Fisher window for step %d opened (%d layers, %.1f MiB of Fisher inverses)",
                    target_step, len(self._fisher), total / 2**20)

    def _add_samples(self, name: str, samples: list) -> None:
        buf = self._buf.setdefault(name, [])
        buf.extend(samples)
        if len(buf) >= self.fisher_block_size:
            t0 = time.perf_counter()
            self._fisher[name].update(torch.stack(buf))
            buf.clear()
            self._window_time += time.perf_counter() - t0

    @torch.no_grad()
    def _sync_pending(self):
        """DDP: average this micro-batch's local gradients over the ranks and feed them to the Fisher.

        Called on every rank at the same points (end of each micro-batch while a window collects), so the
        collectives match. Layer order is the sorted names; a layer without a gradient on some rank counts as
        zeros there (as DDP does for unused parameters), one that had none on any rank adds no sample."""
        if self._world <= 1 or not self._collect:
            return
        import torch.distributed as dist

        names = sorted(self._fisher)
        if not names:
            return
        t0 = time.perf_counter()
        dev = self._modules[names[0]].weight.device
        present = torch.zeros(len(names), dtype=torch.float32, device=dev)
        tensors, works = [], []
        for i, n in enumerate(names):
            got = self._pending.pop(n, None)
            w = self._modules[n].weight
            if got:
                t = got[0] if len(got) == 1 else torch.stack(got).sum(0)  # several hook calls: .grad sums them
                present[i] = 1.0
            else:
                t = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            tensors.append(t)
            works.append(dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True))
        dist.all_reduce(present, op=dist.ReduceOp.SUM)
        for wk in works:
            wk.wait()
        self._pending = {}
        self._window_time += time.perf_counter() - t0
        for i, n in enumerate(names):
            if present[i] > 0:
                self._add_samples(n, [tensors[i].div_(self._world)])

    def _flush(self):
        for n, buf in self._buf.items():
            if buf:
                self._fisher[n].update(torch.stack(buf))
                buf.clear()

    @torch.no_grad()
    def _prune(self, global_step: int, spec: VNMSpec, optimizer=None):
        t0 = time.perf_counter()
        self._flush()
        n_grads = max((f.count for f in self._fisher.values()), default=0)
        fisher_bytes = sum(f.memory_bytes() for f in self._fisher.values())
        score_t = update_t = 0.0
        if self.method == "obs" and n_grads == 0:
            logger.warning("venom_hf: pruning step %d has no gradient samples; OBS reduces to magnitude", global_step)
        for name, module in list(self._modules.items()):
            w = module.weight
            old = self._masks.get(name)
            ts = time.perf_counter()
            if self.method == "magnitude":
                wm = w if old is None else w * old
                mask = make_mask(wm, spec)
                new_w = None
            else:
                fisher = self._fisher.get(name) or EmpiricalBlockFisherInverse(
                    w.shape, self.fisher_block_size, self.damp, self.num_grads, device=w.device)
                mask = obs_mask(w, spec, fisher.group_blocks(spec.m), self.selection)
                score_t += time.perf_counter() - ts
                ts = time.perf_counter()
                new_w = obs_update(w, fisher.finv, mask) if self.obs_update else None
                update_t += time.perf_counter() - ts
            if new_w is not None:
                w.copy_(new_w)
            new_mod = install_mask(self._model, name, module, mask, spec, convert=self.convert)
            self._modules[name] = new_mod
            self._masks[name] = mask.to(w.device)
            w.mul_(self._masks[name].to(w.dtype))
            if optimizer is not None:
                _zero_moments(optimizer, w, self._masks[name])
        self._fisher, self._buf, self._collect, self._fisher_target = {}, {}, False, None
        if self._pending:  # not expected: the Trainer syncs after every micro-batch
            logger.warning("venom_hf: dropping unsynchronised gradient samples of %d layers", len(self._pending))
        self._pending = {}
        if self._world > 1:
            self._verify_ranks(global_step)
        total = sum(m.weight.numel() for m in self._modules.values())
        zeros = sum(int((m.weight == 0).sum()) for m in self._modules.values())
        entry = {
            "step": int(global_step), "spec": str(spec), "method": self.method, "num_grads": int(n_grads),
            "sparsity": zeros / total, "prune_time_s": time.perf_counter() - t0,
            "score_time_s": score_t, "update_time_s": update_t, "fisher_update_time_s": self._window_time,
            "fisher_mib": fisher_bytes / 2**20,
        }
        self.history.append(entry)
        self._pending_logs = {f"vnm/{k}": v for k, v in entry.items() if k not in ("step", "method", "spec")}
        self._pending_logs["vnm/n"] = spec.n
        logger.info("venom_hf: step %d pruned to %s (%s, %d grads): sparsity %.4f in %.2f s", global_step, spec,
                    self.method, n_grads, entry["sparsity"], entry["prune_time_s"])
        return entry

    @torch.no_grad()
    def _verify_ranks(self, global_step: int) -> None:
        """DDP safety check after a pruning step: masks must agree on every rank (else a clear error on every
        rank); the target weights are re-broadcast from rank 0 if their checksums differ at all (they
        should not: identical Fisher and weights give identical OBS updates)."""
        import torch.distributed as dist

        names = sorted(self._modules)
        if not names:
            return
        dev = self._modules[names[0]].weight.device
        sums = torch.zeros(len(names), 4, dtype=torch.float64, device=dev)
        for i, n in enumerate(names):
            sums[i] = _checksums(self._masks[n], self._modules[n].weight.detach()).to(dev)
        hi, lo = sums.clone(), sums.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        bad = [names[i] for i in range(len(names)) if not torch.equal(hi[i, :2], lo[i, :2])]
        if bad:
            raise RuntimeError(
                f"venom_hf: V:N:M masks differ across DDP ranks after pruning step {global_step} in {len(bad)} "
                f"layer(s), e.g. {bad[:3]}. The Fisher statistics or weights diverged between ranks; masks must "
                f"be identical for data-parallel training (see docs/distributed.md).")
        drift = [i for i in range(len(names)) if not torch.equal(hi[i, 2:], lo[i, 2:])]
        if drift:
            logger.warning("venom_hf: step %d: target weights differ across ranks in %d layer(s) after pruning; "
                           "re-broadcasting them from rank 0", global_step, len(drift))
            for i in drift:
                dist.broadcast(self._modules[names[i]].weight.data, src=0)
        self._rank_checks += 1

    @staticmethod
    def _check_parallelism(args, model) -> int:
        """World size of a supported (single-process or DDP) run; refuse sharded data parallelism."""
        reason = None
        if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
            reason = "FSDP"
        elif getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in (
                "1", "true"):
            reason = "DeepSpeed"
        else:
            try:
                from accelerate.state import PartialState

                if PartialState._shared_state:
                    dt = str(PartialState().distributed_type)
                    if "FSDP" in dt or "DEEPSPEED" in dt or "MEGATRON" in dt:
                        reason = dt.split(".")[-1]
            except Exception:  # pragma: no cover - accelerate always present with transformers' Trainer
                pass
        if reason is None and model is not None:
            try:
                from torch.distributed.tensor import DTensor
            except ImportError:  # pragma: no cover
                DTensor = ()
            for p in model.parameters():
                if isinstance(p, DTensor) or isinstance(p.data, DTensor):
                    reason = "DTensor-sharded parameters (FSDP2 / tensor parallelism)"
                    break
                if hasattr(p, "ds_id") or type(p).__name__ == "FlatParameter":
                    reason = "sharded parameters (DeepSpeed ZeRO-3 / FSDP1)"
                    break
        if reason is not None:
            raise NotImplementedError(
                f"venom_hf: VNMPruningCallback does not support {reason} yet: masks, Fisher statistics and the "
                "OBS update need each rank to hold full weights and gradients. Use DDP (plain `accelerate launch` "
                "/ `torchrun`, no FSDP or DeepSpeed config) or a single process; see docs/distributed.md.")
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
        return 1

    def _restore(self, args, state, model):
        """Resume: masks (and a partial Fisher window) from the checkpoint; else masks from the zeros."""
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        saved = torch.load(path, map_location="cpu", weights_only=True) if os.path.exists(path) else None
        spec_now = self.schedule.spec_at(state.global_step)
        if saved is not None:
            specs = saved.get("specs", {})
            for name, module in list(self._modules.items()):
                if name in saved["masks"]:
                    mask = saved["masks"][name].to(module.weight.device)
                    sp = VNMSpec.parse(specs.get(name, str(spec_now)))
                    self._modules[name] = install_mask(model, name, module, mask, sp, convert=self.convert)
                    self._masks[name] = mask
            for name, finv in saved.get("fisher", {}).items():
                m = self._modules[name]
                f = EmpiricalBlockFisherInverse(m.weight.shape, self.fisher_block_size, self.damp, self.num_grads,
                                                device=m.weight.device)
                f.finv.copy_(finv.to(f.finv.device))
                f.count = int(saved["fisher_count"][name])
                self._fisher[name] = f
                if saved.get("buffers", {}).get(name):
                    self._buf[name] = [b.to(m.weight.device) for b in saved["buffers"][name]]
            if self._fisher:
                self._fisher_target = int(saved["fisher_target"])
                self._collected = int(saved.get("collected", 0))
        elif spec_now is not None:
            from ..format import mask_from_weight

            logger.warning("venom_hf: %s not found; re-deriving the %s masks from the weights' zeros", path, spec_now)
            for name, module in list(self._modules.items()):
                mask = mask_from_weight(module.weight.detach(), spec_now)
                self._modules[name] = install_mask(model, name, module, mask, spec_now, convert=self.convert)
                self._masks[name] = mask

    # -- events -------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._reset_runtime()
        self._world = self._check_parallelism(args, model)
        self._attach(model)
        self._last_step = state.global_step
        logger.info("venom_hf: V:N:M schedule %s (%s) on %d layers", self.schedule.describe(), self.method,
                    len(self._modules))
        if state.global_step > 0:
            self._restore(args, state, model)
        # steps due before any training (start_step == 0)
        for t, spec in self.schedule.steps():
            if t <= state.global_step and state.global_step == 0:
                self._log_entry(state, self._prune(0, spec, optimizer))

    @staticmethod
    def _log_entry(state, entry):
        state.log_history.append({**{f"vnm/{k}": v for k, v in entry.items() if k != "step"}, "step": entry["step"]})

    def on_step_begin(self, args, state, control, **kwargs):
        if self.method != "obs":
            return
        nxt = self.schedule.next_step(state.global_step)
        if nxt is None:
            return
        t, _ = nxt
        if t - state.global_step <= self._window_steps(args.gradient_accumulation_steps):
            if self._fisher_target != t:
                self._open_window(t)
            self._collect = self._collected < self.num_grads
            # count micro-batches of this step (capped at num_grads)
            self._collected += args.gradient_accumulation_steps

    def on_substep_end(self, args, state, control, **kwargs):
        self._sync_pending()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._sync_pending()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        with torch.no_grad():
            for name, mask in self._masks.items():
                w = self._modules[name].weight
                w.mul_(mask.to(w.dtype))

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self._collect = False
        for t, spec in self.schedule.steps():
            if t == state.global_step:
                self._log_entry(state, self._prune(t, spec, optimizer))
        self._last_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Trainer.log stores a copy of ``logs`` in log_history before calling on_log: update both
        extra = self.sparsity_logs()
        if logs is not None:
            logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        # DDP: the state is identical on every rank; write it once (per node with save_on_each_node)
        if not getattr(args, "should_save", True) or not os.path.isdir(ckpt):
            return
        payload = {"masks": {n: m.cpu() for n, m in self._masks.items()},
                   "specs": {n: str(getattr(self._modules[n], "spec", "")) for n in self._masks}}
        if self.save_fisher and self._fisher:
            payload["fisher"] = {n: f.finv.cpu() for n, f in self._fisher.items()}
            payload["fisher_count"] = {n: f.count for n, f in self._fisher.items()}
            payload["buffers"] = {n: [b.cpu() for b in buf] for n, buf in self._buf.items()}
            payload["fisher_target"] = self._fisher_target
            payload["collected"] = self._collected
        torch.save(payload, os.path.join(ckpt, STATE_FILE))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.pack_at_end:
            if state.global_step < self.schedule.end_step or not self.spec.packable:
                logger.warning("venom_hf: not packing: the schedule did not reach %s or it is not V:2:M", self.spec)
                return
            from ..hf import compress

            compress(model)

    # -- reporting ----------------------------------------------------------------------------------
    def sparsity_logs(self) -> dict:
        if not self._modules:
            return {}
        total = sum(m.weight.numel() for m in self._modules.values())
        zeros = sum(int((m.weight == 0).sum()) for m in self._modules.values())
        out = {"vnm/sparsity": zeros / total}
        if self.history:
            out["vnm/n"] = VNMSpec.parse(self.history[-1]["spec"]).n
            out["vnm/prune_time_total_s"] = sum(h["prune_time_s"] for h in self.history)
        return out

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return dict(self._masks)


@torch.no_grad()
def _checksums(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(4,) float64: kept count and position-weighted sum of a mask (integers, exact in float64 whatever the
    summation order), sum and position-weighted sum of the weight. Row chunks keep temporaries ~4M elements."""
    R, K = weight.shape
    out = torch.zeros(4, dtype=torch.float64, device=weight.device)
    rows = max(1, (1 << 22) // max(1, K))
    col = torch.arange(K, device=weight.device, dtype=torch.float64).remainder_(251).add_(1)
    for r0 in range(0, R, rows):
        m = mask[r0 : r0 + rows].to(device=weight.device, dtype=torch.float64)
        w = weight[r0 : r0 + rows].to(torch.float64)
        rw = torch.arange(r0, r0 + m.shape[0], device=weight.device, dtype=torch.float64).remainder_(257).add_(1)
        out[0] += m.sum()
        out[1] += ((m @ col) * rw).sum()
        out[2] += w.sum()
        out[3] += ((w @ col) * rw).sum()
    return out


def _zero_moments(optimizer, param: torch.Tensor, mask: torch.Tensor) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    st = inner.state.get(param) if hasattr(inner, "state") else None
    if not st:
        return
    for v in st.values():
        if isinstance(v, torch.Tensor) and v.shape == param.shape:
            v.mul_(mask.to(v.dtype))


class DistillationLoss:
    """Knowledge distillation from a (dense) teacher, usable as ``Trainer(compute_loss_func=...)``.

    ``loss = hardness * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - hardness) * CE(labels)``, the oBERT
    recipe's form (hardness 1.0, T = 2.0 on SQuAD). ``compute_loss_func`` receives no inputs, so the student
    gets a forward hook that runs the teacher on the same inputs (under ``no_grad``). Logits of rank 2
    (classification) or 3 (causal LM, shifted by one; labels == -100 are ignored) are supported.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, temperature: float = 2.0, hardness: float = 1.0):
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature = float(temperature)
        self.hardness = float(hardness)
        self._teacher_logits = None
        self._handle = student.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        if not module.training:
            self._teacher_logits = None
            return
        kw = {k: v for k, v in kwargs.items() if k != "labels"}
        with torch.no_grad():
            self._teacher_logits = self.teacher(*args, **kw).logits.detach()

    def remove(self):
        self._handle.remove()

    def __call__(self, outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        if logits.dim() == 3:
            s, y = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
        else:
            s, y = logits, labels
        valid = y != -100
        reduction = "sum" if num_items_in_batch is not None else "mean"
        ce = F.cross_entropy(s.float(), y, ignore_index=-100, reduction=reduction)
        if num_items_in_batch is not None:
            ce = ce / num_items_in_batch
        t_logits = self._teacher_logits
        if t_logits is None or self.hardness == 0:
            return ce
        t = t_logits[:, :-1].flatten(0, 1) if t_logits.dim() == 3 else t_logits
        T = self.temperature
        kl = F.kl_div(F.log_softmax(s[valid].float() / T, -1), F.log_softmax(t[valid].float() / T, -1),
                      log_target=True, reduction="batchmean") * T * T
        return self.hardness * kl + (1.0 - self.hardness) * ce
