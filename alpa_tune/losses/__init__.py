"""The loss library: ALPA (fused, exact, finite in every dtype) and the paper's baselines.

    from alpa_tune.losses import build_loss
    loss = build_loss("alpa", alpha=0.875, beta=1.625, gamma_pos=0, gamma_neg=4)
    loss.set_params(gamma_neg=3.5)          # a new trial: nothing rebuilt or recompiled
    value = loss(logits, labels)            # labels: int64 (N,) or float one-hot (N, C)

Every loss is a :class:`torch.nn.Module` whose ``params`` rebuild it with
``build_loss(loss.name, **loss.params)``. Names: see :func:`available_losses`.
"""

from __future__ import annotations

from ._alpa import ALPALoss, alpa_unfused
from ._alpa_kernels import compile_enabled
from ._base import LossConfigError, TunableLoss
from ._baselines import ASLLoss, BCELoss, CELoss, ClassBalancedLoss, FocalLoss, LDAMLoss, effective_number_weights
from ._registry import (
    alias_params,
    available_losses,
    build_for_counts,
    build_loss,
    class_counts_for,
    loss_kwargs,
    loss_paper_points,
    loss_paper_setting,
    loss_parameters,
    loss_search_space,
    needs_class_counts,
    register_loss,
)

for _cls in (ALPALoss, ASLLoss, FocalLoss, BCELoss, CELoss, ClassBalancedLoss, LDAMLoss):
    register_loss(_cls)
del _cls

__all__ = [
    "ALPALoss", "ASLLoss", "BCELoss", "CELoss", "ClassBalancedLoss", "FocalLoss", "LDAMLoss",
    "LossConfigError", "TunableLoss", "alias_params", "alpa_unfused", "available_losses", "build_for_counts", "build_loss", "class_counts_for",
    "compile_enabled", "effective_number_weights", "loss_kwargs", "loss_paper_points",
    "loss_paper_setting", "loss_parameters", "loss_search_space", "needs_class_counts", "register_loss",
]
