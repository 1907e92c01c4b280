"""V:N:M pruning: gradual (``VNMPruningCallback`` for ``transformers.Trainer``) and one-shot (``prune``).

Layering: this package imports ``venom_hf.format``, ``venom_hf.modules`` and (for packing) ``venom_hf.hf``;
nothing below it imports ``venom_hf.pruning``.
"""

from .callback import STATE_FILE, DistillationLoss, VNMPruningCallback
from .oneshot import prune, prune_layer_obs
from .schedule import VNMSchedule
from .scores import (
    EmpiricalBlockFisherInverse,
    element_saliency,
    group_hessians,
    keepset_saliency,
    magnitude_scores,
    obs_mask,
    obs_update,
    select_keepsets,
)
from .targets import find_targets

__all__ = [
    "VNMPruningCallback",
    "DistillationLoss",
    "prune",
    "prune_layer_obs",
    "VNMSchedule",
    "EmpiricalBlockFisherInverse",
    "magnitude_scores",
    "element_saliency",
    "group_hessians",
    "keepset_saliency",
    "obs_mask",
    "obs_update",
    "select_keepsets",
    "find_targets",
    "STATE_FILE",
]
