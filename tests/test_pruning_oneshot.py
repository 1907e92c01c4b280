"""One-shot layer-wise pruning (venom_hf.prune) on a tiny Llama."""

import os
import sys

import torch

import venom_hf
from venom_hf.format import check_mask
from venom_hf.pruning import find_targets

sys.path.insert(0, os.path.dirname(__file__))
from _pruning_utils import tiny_llama  # noqa: E402


def _calib(n=4, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (2, seq), generator=g)} for _ in range(n)]


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in batches])


def test_oneshot_obs_and_magnitude():
    dense = tiny_llama()
    calib, held = _calib(), _calib(seed=1)
    ref = _logits(dense, held)
    errs = {}
    for method in ("magnitude", "obs"):
        model = tiny_llama()
        rep = venom_hf.prune(model, calib, "4:2:8", method=method, progress=False)
        assert rep["layers"] == 14 and abs(rep["sparsity"] - 0.75) < 1e-6
        for n, mod in find_targets(model).items():
            assert type(mod).__name__ == "VNMMaskedLinear"
            check_mask(mod.mask, "4:2:8")
            assert (mod.weight[~mod.mask] == 0).all()
        assert model.lm_head.weight.ne(0).all() if not model.config.tie_word_embeddings else True
        errs[method] = float(((_logits(model, held) - ref) ** 2).mean())
    assert errs["obs"] < errs["magnitude"]


def test_oneshot_non_sequential_plain_linear():
    model = tiny_llama()
    rep = venom_hf.prune(model, _calib(2), "2:2:16", sequential=False, convert=False, progress=False)
    for n, mod in find_targets(model).items():
        assert type(mod) is torch.nn.Linear
        check_mask(mod.weight != 0, "2:2:16")
    assert rep["calibration_batches"] == 2
