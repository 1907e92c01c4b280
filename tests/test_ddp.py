"""VNMPruningCallback under real DDP: 2 CPU processes, gloo backend, transformers.Trainer (issue 8).

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
def _worker(out: str, single: bool) -> None:
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
                        "masks": {n: m.clone() for n, m in cb.masks.items()},
                        "weights": {n: cb._modules[n].weight.detach().clone() for n in cb.masks}}
            for n, mask in cb.masks.items():  # every optimizer step, not only beta steps
                self.zero_violations += int((cb._modules[n].weight.detach()[~mask] != 0).sum())

    rec = Record()
    bs = 4 if single else 2
    args = TrainingArguments(
        os.path.join(out, "single" if single else "ddp"), max_steps=MAX_STEPS, per_device_train_batch_size=bs,
        gradient_accumulation_steps=2, learning_rate=2e-3, weight_decay=0.1, max_grad_norm=1.0,
        train_sampling_strategy="sequential", logging_steps=100, save_strategy="no", report_to=[], use_cpu=True,
        seed=0, data_seed=0, disable_tqdm=True, ddp_backend=None if single else "gloo",
        dataloader_num_workers=0)
    tr = Trainer(model=model, args=args, train_dataset=ToyClassification(n=64), callbacks=[cb, rec])
    t0 = time.perf_counter()
    tr.train()
    train_s = time.perf_counter() - t0

    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    res = {"world": world, "rank": rank, "steps": rec.steps, "zero_violations": rec.zero_violations,
           "history": cb.history, "rank_checks": cb._rank_checks, "train_s": train_s,
           "final": {k: v.detach().clone() for k, v in model.state_dict().items()},
           "final_masks": {n: m.clone() for n, m in cb.masks.items()}}
    if world > 1:
        # the safety checks themselves: (a) a drifted weight is re-broadcast from rank 0,
        name = sorted(cb.masks)[0]
        w = cb._modules[name].weight
        ref = w.detach().clone()
        if rank == 1:
            with torch.no_grad():
                w.add_(1e-3 * cb.masks[name])
        cb._verify_ranks(-1)
        res["rebroadcast_ok"] = torch.equal(w.detach(), ref)
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


def _run(cmd, out):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", MASTER_ADDR="127.0.0.1")
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        env.pop(k, None)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    if p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}")


@pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with the gloo backend is not available")
@pytest.mark.skipif(not _loopback_ok(), reason="cannot bind a TCP socket on 127.0.0.1 for the gloo rendezvous")
def test_ddp_gloo_two_processes_match_single_process(tmp_path):
    out = str(tmp_path)
    me = os.path.abspath(__file__)
    t0 = time.perf_counter()
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", me,
          "--out", out], out)
    t_ddp = time.perf_counter() - t0
    _run([sys.executable, me, "--out", out, "--single"], out)
    r0, r1 = (torch.load(os.path.join(out, f"ddp_rank{r}.pt"), weights_only=False) for r in (0, 1))
    ref = torch.load(os.path.join(out, "single_rank0.pt"), weights_only=False)
    print(f"DDP run {t_ddp:.1f} s (train {r0['train_s']:.1f} s); single run train {ref['train_s']:.1f} s")

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
            torch.testing.assert_close(s0["weights"][n], sr["weights"][n], rtol=RTOL, atol=ATOL)

    assert r0["final"].keys() == ref["final"].keys()
    for k in r0["final"]:
        assert torch.equal(r0["final"][k], r1["final"][k]), k
        torch.testing.assert_close(r0["final"][k], ref["final"][k], rtol=RTOL, atol=ATOL, msg=k)
    for n, m in r0["final_masks"].items():
        assert m.float().mean() == 0.25
        assert (r0["final"][n + ".weight"][~m] == 0).all() and (r1["final"][n + ".weight"][~m] == 0).all()

    assert r0["rebroadcast_ok"] and r1["rebroadcast_ok"]
    for r in (r0, r1):
        assert r["mismatch_error"] is not None and "masks differ across DDP ranks" in r["mismatch_error"]


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
    a = ap.parse_args()
    _worker(a.out, a.single)
