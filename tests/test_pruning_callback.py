"""VNMPruningCallback under transformers.Trainer on CPU with a tiny BERT."""

import os
import sys

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from venom_hf.format import check_mask
from venom_hf.pruning import STATE_FILE, DistillationLoss, VNMPruningCallback

sys.path.insert(0, os.path.dirname(__file__))
from _pruning_utils import ToyClassification, tiny_bert  # noqa: E402


class _CheckEveryStep(TrainerCallback):
    """Runs after the pruning callback: masks valid at every beta step, pruned weights zero at every step."""

    def __init__(self, cb):
        self.cb, self.seen = cb, []

    def on_step_end(self, args, state, control, **kw):
        for h in self.cb.history:
            if h["step"] == state.global_step:
                for n, mask in self.cb.masks.items():
                    check_mask(mask, h["spec"])
                    assert str(self.cb._modules[n].spec) == h["spec"]
                self.seen.append(h["spec"])
        for n, mask in self.cb.masks.items():
            assert (self.cb._modules[n].weight[~mask] == 0).all()


def _args(d, **kw):
    base = dict(max_steps=12, per_device_train_batch_size=8, learning_rate=2e-3, weight_decay=0.1,
                logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                data_seed=0, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(d, **base)


@pytest.mark.parametrize("method,accum", [("obs", 1), ("obs", 2), ("magnitude", 1)])
def test_trainer_masks_every_step_and_exact_zeros(tmp_path, method, accum):
    model = tiny_bert()
    cb = VNMPruningCallback("4:2:8", start_step=0, end_step=8, method=method, num_grads=8, ramp="linear")
    chk = _CheckEveryStep(cb)
    tr = Trainer(model=model, args=_args(str(tmp_path), gradient_accumulation_steps=accum),
                 train_dataset=ToyClassification(), callbacks=[cb, chk])
    tr.train()
    path = ["4:7:8", "4:6:8", "4:5:8", "4:4:8", "4:3:8", "4:2:8"]
    assert [h["spec"] for h in cb.history] == path and cb.history[0]["step"] == 0
    assert chk.seen == path[1:]  # step 0 is pruned in on_train_begin
    assert len(cb.masks) == 12  # 6 Linears x 2 layers; pooler and classifier stay dense
    for n, mask in cb.masks.items():
        w = model.get_submodule(n).weight
        assert (w[~mask] == 0).all() and mask.float().mean() == 0.25
        st = tr.optimizer.state[w]
        assert (st["exp_avg"][~mask] == 0).all() and (st["exp_avg_sq"][~mask] == 0).all()
    assert model.bert.pooler.dense.weight.ne(0).all()
    entries = [h for h in tr.state.log_history if "vnm/spec" in h]
    assert [e["vnm/spec"] for e in entries] == path
    if method == "obs":
        # the window is the micro-batches since the previous step (or num_grads)
        assert all(e["vnm/num_grads"] > 0 for e in entries[1:])
        assert entries[-1]["vnm/fisher_mib"] > 0
    logged = [h for h in tr.state.log_history if "loss" in h]
    assert logged and "vnm/sparsity" in tr.state.log_history[-1]


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True


def _final(model, cb):
    return {n: (model.get_submodule(n).weight.detach().clone(), m.clone()) for n, m in cb.masks.items()}


def test_resume_gives_same_masks_and_weights(tmp_path):
    kw = dict(spec="4:2:8", start_step=2, end_step=10, num_grads=6, ramp="linear")
    # uninterrupted
    m1 = tiny_bert()
    cb1 = VNMPruningCallback(**kw)
    Trainer(model=m1, args=_args(str(tmp_path / "a")), train_dataset=ToyClassification(), callbacks=[cb1]).train()
    ref = _final(m1, cb1)
    # interrupted at step 5 (inside the Fisher window of a step), resumed from the checkpoint
    d = str(tmp_path / "b")
    m2 = tiny_bert()
    cb2 = VNMPruningCallback(**kw)
    Trainer(model=m2, args=_args(d, save_strategy="steps", save_steps=5),
            train_dataset=ToyClassification(), callbacks=[cb2, _StopAt(5)]).train()
    assert os.path.exists(os.path.join(d, "checkpoint-5", STATE_FILE))
    m3 = tiny_bert(seed=1)  # fresh dense model, weights come from the checkpoint
    cb3 = VNMPruningCallback(**kw)
    tr3 = Trainer(model=m3, args=_args(d, restore_callback_states_from_checkpoint=True, save_strategy="steps",
                                       save_steps=5),
                  train_dataset=ToyClassification(), callbacks=[cb3])
    tr3.train(resume_from_checkpoint=os.path.join(d, "checkpoint-5"))
    cb3 = next(c for c in tr3.callback_handler.callbacks if isinstance(c, VNMPruningCallback))
    got = _final(m3, cb3)
    assert got.keys() == ref.keys()
    for n in ref:
        assert torch.equal(got[n][1], ref[n][1]), n
        torch.testing.assert_close(got[n][0], ref[n][0], rtol=1e-4, atol=1e-5)
    assert [h["spec"] for h in cb3.history] == [h["spec"] for h in cb1.history]


def test_distillation_loss_trains(tmp_path):
    teacher = tiny_bert()
    student = tiny_bert()
    student.load_state_dict(teacher.state_dict())
    kd = DistillationLoss(teacher, student, temperature=2.0, hardness=0.5)
    cb = VNMPruningCallback("4:2:8", start_step=0, end_step=4, num_grads=4, init_n=4, ramp="linear")
    tr = Trainer(model=student, args=_args(str(tmp_path), max_steps=6), train_dataset=ToyClassification(),
                 callbacks=[cb], compute_loss_func=kd)
    out = tr.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert kd._teacher_logits is not None
    kd.remove()
