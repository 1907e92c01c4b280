"""VNMPruningCallback under real DDP: 2 CPU processes, gloo backend, transformers.Trainer.

The test launches this file twice as a worker:

* ``torchrun --standalone --nproc-per-node 2 tests/test_ddp.py --out D`` -- DDP, per-device micro-batch 2,
  gradient accumulation 2 (global micro-batch 4, global batch 8);
* ``python tests/test_ddp.py --out D --single`` -- one process, micro-batch 4, accumulation 2 (same global
  batch, same sequential data order, dropout off).

Each run prunes a tiny BERT 4:8:8 -> 4:4:8 -> 4:3:8 -> 4:2:8 with OBS at steps 2, 4, 6 (Fisher windows of 4
micro-batch gradients, gradient accumulation so ``no_sync`` micro-batches are exercised) and trains to step 8.
Asserted: masks identical on both ranks at every beta step and equal to the single-process masks; pruned
weights exactly zero on every rank; final weights of the two ranks bitwise equal and equal to the
single-process run within rtol 1e-4 / atol 1e-5 (float sums in a different order: DDP averages two
half-batch gradients); the cross-rank mask check raises on a deliberately corrupted mask and a drifted weight
is re-broadcast from rank 0.

``--backend nccl`` runs the same worker on GPUs (each rank on ``cuda:LOCAL_RANK``; the single-process reference
on one GPU): ``python -m venom_hf.bench.multi_gpu ddp-check`` does that on a 2-GPU machine
(``scripts/gpu_check.sh --bench multi-gpu``).
CI only runs the gloo/CPU test below.
"""

import argparse
import os
import socket
import subprocess
import sys
import time
import types

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SPEC, STEPS, MAX_STEPS = "4:2:8", [2, 4, 6], 8
RTOL, ATOL = 1e-4, 1e-5


# ------------------------------------------------------------------------------------------------ worker
def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def _worker(out: str, single: bool, backend: str = "gloo") -> None:
    sys.path.insert(0, HERE)
    from _pruning_utils import ToyClassification, tiny_bert
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from venom_hf.format import check_mask
    from venom_hf.pruning import VNMPruningCallback

    model = tiny_bert()
    # BertForSequenceClassification.forward takes **kwargs but its loss ignores num_items_in_batch: left alone,
    # Trainer would then skip the 1/accumulation scaling and multiply the loss by the world size under DDP
    # (average_tokens_across_devices), so the DDP gradient would be 2x the single-process one. With the flag
    # off the loss is a plain per-micro-batch mean on every rank, and DDP's average is the global-batch mean.
    model.accepts_loss_kwargs = False
    for m in model.modules():  # dropout would draw different masks on a 2-row and a 4-row micro-batch
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cb = VNMPruningCallback(SPEC, start_step=STEPS[0], end_step=STEPS[-1], init_n=4, num_steps=len(STEPS),
                            ramp="linear", method="obs", num_grads=4)

    class Record(TrainerCallback):  # runs after the pruning callback
        def __init__(self):
            self.steps, self.zero_violations = {}, 0

        def on_step_end(self, args, state, control, **kw):
            for h in cb.history:
                if h["step"] == state.global_step:
                    for n, mask in cb.masks.items():
                        check_mask(mask, h["spec"])
                    self.steps[state.global_step] = {
                        "spec": h["spec"], "num_grads": h["num_grads"],
                        "masks": {n: _cpu(m) for n, m in cb.masks.items()},
                        "weights": {n: _cpu(cb._modules[n].weight) for n in cb.masks}}
            for n, mask in cb.masks.items():  # every optimizer step, not only beta steps
                self.zero_violations += int((cb._modules[n].weight.detach()[~mask] != 0).sum())

    rec = Record()
    bs = 4 if single else 2
    gpu = backend == "nccl"  # GPUs: Trainer puts each rank on cuda:LOCAL_RANK (the single run sees one GPU)
    args = TrainingArguments(
        os.path.join(out, "single" if single else "ddp"), max_steps=MAX_STEPS, per_device_train_batch_size=bs,
        gradient_accumulation_steps=2, learning_rate=2e-3, weight_decay=0.1, max_grad_norm=1.0,
        train_sampling_strategy="sequential", logging_steps=100, save_strategy="no", report_to=[], use_cpu=not gpu,
        seed=0, data_seed=0, disable_tqdm=True, ddp_backend=None if single else backend,
        dataloader_num_workers=0)
    tr = Trainer(model=model, args=args, train_dataset=ToyClassification(n=64), callbacks=[cb, rec])
    t0 = time.perf_counter()
    tr.train()
    train_s = time.perf_counter() - t0

    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    res = {"world": world, "rank": rank, "steps": rec.steps, "zero_violations": rec.zero_violations,
           "history": cb.history, "rank_checks": cb._rank_checks, "train_s": train_s, "backend": backend,
           "device": str(next(model.parameters()).device),
           "final": {k: _cpu(v) for k, v in model.state_dict().items()},
           "final_masks": {n: _cpu(m) for n, m in cb.masks.items()}}
    if world > 1:
        # the safety checks themselves: (a) a drifted weight is re-broadcast from rank 0,
        name = sorted(cb.masks)[0]
        w = cb._modules[name].weight
        ref = w.detach().clone()
        if rank == 1:
            with torch.no_grad():
                w.add_(1e-3 * cb.masks[name])
        cb._verify_ranks(-1)
        res["rebroadcast_ok"] = bool(torch.equal(w.detach(), ref))
        # (b) masks that disagree across ranks raise a clear error on every rank
        if rank == 1:
            m = cb._masks[name]
            cb._masks[name] = m.roll(1, dims=1)
        try:
            cb._verify_ranks(-2)
            res["mismatch_error"] = None
        except RuntimeError as e:
            res["mismatch_error"] = str(e)
        dist.barrier()
    torch.save(res, os.path.join(out, f"{'single' if single else 'ddp'}_rank{rank}.pt"))


# ------------------------------------------------------------------------------------------------ test
def _gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def _loopback_ok() -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
        return True
    except OSError:
        return False


def _run(cmd, out, extra_env=None, timeout=240):
    src = os.path.join(ROOT, "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", MASTER_ADDR="127.0.0.1")
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        env.pop(k, None)
    env.update(extra_env or {})
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}")


def launch(out: str, backend: str = "gloo", timeout: int = 240) -> dict:
    """Run the 2-process DDP worker and the single-process reference; returns their wall times (s).

    ``backend="nccl"``: two GPUs (rank r on cuda:r); the reference runs on the first GPU alone
    (``CUDA_VISIBLE_DEVICES`` set to one card, so the Trainer does not fall back to ``DataParallel``)."""
    me = os.path.abspath(__file__)
    t0 = time.perf_counter()
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", me,
          "--out", out, "--backend", backend], out, timeout=timeout)
    t_ddp = time.perf_counter() - t0
    single_env = None
    if backend == "nccl":
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        single_env = {"CUDA_VISIBLE_DEVICES": first}
    t0 = time.perf_counter()
    _run([sys.executable, me, "--out", out, "--single", "--backend", backend], out, extra_env=single_env,
         timeout=timeout)
    return {"ddp_wall_s": t_ddp, "single_wall_s": time.perf_counter() - t0}


def check_results(out: str, rtol: float = RTOL, atol: float = ATOL, stats: dict | None = None) -> dict:
    """Load the three result files of :func:`launch` and assert everything the issue asks. Returns the numbers
    for a report (max abs / rel difference to the single-process run, mask entries that differ, timings);
    they are filled into ``stats`` (if given) before any assert, so a caller still has them on failure."""
    stats = {} if stats is None else stats
    r0, r1 = (torch.load(os.path.join(out, f"ddp_rank{r}.pt"), weights_only=False, map_location="cpu")
              for r in (0, 1))
    ref = torch.load(os.path.join(out, "single_rank0.pt"), weights_only=False, map_location="cpu")
    stats.update({"backend": r0["backend"], "devices": [r0["device"], r1["device"], ref["device"]],
                  "train_s": {"ddp": r0["train_s"], "single": ref["train_s"]},
                  "specs": {t: r0["steps"][t]["spec"] for t in r0["steps"]},
                  "num_grads": {t: r0["steps"][t]["num_grads"] for t in r0["steps"]},
                  "rank_checks": [r0["rank_checks"], r1["rank_checks"]],
                  "zero_violations": [r0["zero_violations"], r1["zero_violations"], ref["zero_violations"]]})
    common = sorted(set(r0["steps"]) & set(r1["steps"]) & set(ref["steps"]))
    stats["mask_entries_differing_between_ranks"] = {
        t: sum(int((r0["steps"][t]["masks"][n] != r1["steps"][t]["masks"][n]).sum()) for n in r0["steps"][t]["masks"])
        for t in common}
    stats["mask_entries_differing_from_single"] = {
        t: sum(int((r0["steps"][t]["masks"][n] != ref["steps"][t]["masks"][n]).sum()) for n in r0["steps"][t]["masks"])
        for t in common}
    diff = {k: float((r0["final"][k].double() - ref["final"][k].double()).abs().max()) for k in r0["final"]
            if r0["final"][k].is_floating_point()}
    worst = max(diff, key=diff.get)
    stats["final_max_abs_diff"] = diff[worst]
    stats["final_max_abs_diff_tensor"] = worst
    stats["final_max_rel_diff"] = max(  # relative to max(|w|, 1e-3)
        float(((r0["final"][k].double() - ref["final"][k].double()).abs()
               / ref["final"][k].double().abs().clamp_min(1e-3)).max()) for k in diff)
    stats["ranks_bitwise_equal"] = all(torch.equal(r0["final"][k], r1["final"][k]) for k in r0["final"])
    stats["tolerance"] = {"rtol": rtol, "atol": atol}

    assert r0["world"] == r1["world"] == 2 and ref["world"] == 1
    path = ["4:4:8", "4:3:8", "4:2:8"]
    for r in (r0, r1, ref):
        assert sorted(r["steps"]) == STEPS and [r["steps"][t]["spec"] for t in STEPS] == path
        assert r["zero_violations"] == 0
        # one Fisher sample per global micro-batch: 4 per window, as in the single-process run
        assert [r["steps"][t]["num_grads"] for t in STEPS] == [4, 4, 4]
    assert r0["rank_checks"] == r1["rank_checks"] == len(STEPS) and ref["rank_checks"] == 0

    for t in STEPS:
        s0, s1, sr = r0["steps"][t], r1["steps"][t], ref["steps"][t]
        assert s0["masks"].keys() == s1["masks"].keys() == sr["masks"].keys() and len(s0["masks"]) == 12
        for n in s0["masks"]:
            assert torch.equal(s0["masks"][n], s1["masks"][n]), (t, n, "ranks disagree")
            assert torch.equal(s0["masks"][n], sr["masks"][n]), (t, n, "DDP mask != single-process mask")
            assert torch.equal(s0["weights"][n], s1["weights"][n]), (t, n)
            assert (s0["weights"][n][~s0["masks"][n]] == 0).all()
            torch.testing.assert_close(s0["weights"][n], sr["weights"][n], rtol=rtol, atol=atol)

    assert r0["final"].keys() == ref["final"].keys()
    for k in r0["final"]:
        assert torch.equal(r0["final"][k], r1["final"][k]), k
        torch.testing.assert_close(r0["final"][k], ref["final"][k], rtol=rtol, atol=atol, msg=k)
    for n, m in r0["final_masks"].items():
        assert m.float().mean() == 0.25
        assert (r0["final"][n + ".weight"][~m] == 0).all() and (r1["final"][n + ".weight"][~m] == 0).all()

    assert r0["rebroadcast_ok"] and r1["rebroadcast_ok"]
    for r in (r0, r1):
        assert r["mismatch_error"] is not None and "masks differ across DDP ranks" in r["mismatch_error"]
    stats["rebroadcast_ok"], stats["mismatch_error_raised"] = True, True
    stats["passed"] = True
    return stats


@pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with the gloo backend is not available")
@pytest.mark.skipif(not _loopback_ok(), reason="cannot bind a TCP socket on 127.0.0.1 for the gloo rendezvous")
def test_ddp_gloo_two_processes_match_single_process(tmp_path):
    out = str(tmp_path)
    t = launch(out, "gloo")
    stats = check_results(out)
    print(f"DDP run {t['ddp_wall_s']:.1f} s (train {stats['train_s']['ddp']:.1f} s); single run train "
          f"{stats['train_s']['single']:.1f} s; final max abs diff {stats['final_max_abs_diff']:.2e}")


@pytest.mark.parametrize("args,what", [
    (types.SimpleNamespace(fsdp="full_shard"), "FSDP"),
    (types.SimpleNamespace(fsdp=[], deepspeed={"zero_optimization": {"stage": 3}}), "DeepSpeed"),
])
def test_sharded_data_parallel_is_refused(args, what, monkeypatch):
    from venom_hf.pruning import VNMPruningCallback

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    with pytest.raises(NotImplementedError, match=what):
        VNMPruningCallback._check_parallelism(args, torch.nn.Linear(8, 8))


def test_single_process_world_is_one():
    from venom_hf.pruning import VNMPruningCallback

    assert VNMPruningCallback._check_parallelism(types.SimpleNamespace(fsdp=[], deepspeed=None),
                                                 torch.nn.Linear(8, 8)) == 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--single", action="store_true")
    ap.add_argument("--backend", choices=["gloo", "nccl"], default=os.environ.get("VENOM_HF_DDP_BACKEND", "gloo"))
    a = ap.parse_args()
    _worker(a.out, a.single, a.backend)
