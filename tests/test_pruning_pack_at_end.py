"""VNMPruningCallback(pack_at_end=True): the trained model ends with packed layers that compute the same."""

import os
import sys

import copy

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from venom_hf import VNMMaskedLinear, VNMSparseLinear
from venom_hf.pruning import VNMPruningCallback

sys.path.insert(0, os.path.dirname(__file__))
from _pruning_utils import ToyClassification, tiny_bert  # noqa: E402


class _SnapshotBeforePacking(TrainerCallback):
    """Listed before the pruning callback, so its on_train_end sees the final masked model."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.masked = copy.deepcopy(model)


def test_pack_at_end_gives_packed_layers_with_masked_outputs(tmp_path):
    model = tiny_bert()
    cb = VNMPruningCallback("4:2:8", start_step=0, end_step=6, method="magnitude", ramp="linear", pack_at_end=True)
    args = TrainingArguments(str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=2e-3,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    data = ToyClassification()
    snap = _SnapshotBeforePacking()
    Trainer(model=model, args=args, train_dataset=data, callbacks=[snap, cb]).train()
    packed = [n for n, m in model.named_modules() if isinstance(m, VNMSparseLinear)]
    assert len(packed) == 12 and not any(isinstance(m, VNMMaskedLinear) for m in model.modules())
    assert model.config.quantization_config.format == "packed"
    # each packed layer holds exactly the masked weight the training ended with
    for name in packed:
        masked = snap.masked.get_submodule(name)
        assert isinstance(masked, VNMMaskedLinear)
        assert torch.equal(model.get_submodule(name).to_dense_weight(), masked.weight * masked.mask)
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits, ref = model.eval()(**batch).logits, snap.masked.eval()(**batch).logits
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
