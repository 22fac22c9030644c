"""Training-time methods: batch norm between factors, force regularization, fixed-point factors.

Three ways to make a decomposed model recover more of the original's quality, or
cost less, during fine-tuning. Each hooks into the task's own training loop
(``task.finetune(model, steps, seed=...)``), which it never replaces:

- :func:`insert_factor_bn` / :func:`fold_factor_bn` — a batch norm after every
  factor of a decomposed layer but the last, trained with the factors and folded
  back into the factor before it for export (Tai et al. 2015). The exported model
  has the plain decomposed structure again (plus a bias on the factors that had
  none, recorded in the plan as ``options["bias_after_fold"]``).
- :func:`force_regularize` — before decomposing, train a copy of the dense model
  while every optimizer step is followed by a pull of each target layer's weight
  toward its rank-r subspace, so that the truncation to the planned rank then
  loses less (Wen et al. 2017's idea; a proximal pull toward the planned rank
  instead of their pairwise filter force — :func:`force_regularize` says why).
- :func:`quantize_factors` / :func:`freeze_fixed_point` — fixed-point factors
  (Wang & Cheng 2017): per-output-channel symmetric b-bit weights, fake-quantised
  with a straight-through estimator while fine-tuning, then stored as int8 tensors
  with per-channel float scales (``options["fixed_point"] = b`` in the plan, so that
  :func:`autorank.load` rebuilds them). :func:`model_bytes` is the stored size.

:func:`apply_training` strings them together for the search's fine-tuning stage
(:meth:`autorank.search.trial.TrialRunner.finetune`).

One module per method: :mod:`autorank.training.bn`, :mod:`autorank.training.force`,
:mod:`autorank.training.fixed_point`; the stage in :mod:`autorank.training.stage`. The
layer structures they leave in a model (and that :func:`autorank.load` rebuilds)
are in :mod:`autorank.factor_layers`.

References
----------
- C. Tai, T. Xiao, Y. Zhang, X. Wang, W. E. "Convolutional neural networks with
  low-rank regularization." ICLR 2016, arXiv:1511.06067 (2015).
- W. Wen, C. Xu, C. Wu, Y. Wang, Y. Chen, H. Li. "Coordinating Filters for Faster
  Deep Neural Networks." ICCV 2017.
- P. Wang, J. Cheng. "Fixed-Point Factorized Networks." CVPR 2017.
"""


from __future__ import annotations

from autorank.errors import TrainingError
from autorank.factor_layers import (
    FactorBatchNorm1d,
    FactorBatchNorm2d,
    FixedPointConv2d,
    FixedPointLinear,
    model_bytes,
    quantize_per_channel,
    restore_structure,
)
from autorank.training.bn import fold_factor_bn, insert_factor_bn
from autorank.training.fixed_point import FakeQuantize, freeze_fixed_point, quantize_factors
from autorank.training.force import PullTarget, energy_share, force_regularize, force_targets, project
from autorank.training.stage import apply_training, deployed_zero_shot

__all__ = [
    "TrainingError",
    "FactorBatchNorm2d",
    "FactorBatchNorm1d",
    "insert_factor_bn",
    "fold_factor_bn",
    "PullTarget",
    "force_targets",
    "force_regularize",
    "energy_share",
    "project",
    "FakeQuantize",
    "FixedPointConv2d",
    "FixedPointLinear",
    "quantize_per_channel",
    "quantize_factors",
    "freeze_fixed_point",
    "restore_structure",
    "model_bytes",
    "apply_training",
    "deployed_zero_shot",
]
