"""The paper's comparison losses, each in its published form, computed stably.

All take logits (N, C) and int64 indices (N,) or float one-/multi-hot (N, C) targets. Sigmoid
losses sum over all N x C elements; softmax losses sum over the N samples. Half-precision
inputs are computed in float32. Autograd differentiates; every power of a probability is
taken as ``exp(gamma * logsigmoid(.))`` (or guarded where it can be 0), so fractional gammas
keep finite gradients where ``p ** gamma`` would not.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from alpa_tune.space import Choice, Param, Real

from ._base import TunableLoss, check_inputs, compute_dtype, one_hot, reduce


class _Baseline(TunableLoss):
    """Shared forward: validate inputs, compute in float32/64 outside autocast, reduce."""

    _needs_counts = False

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` (N, C) against int64 indices (N,) or float one/multi-hot (N, C)."""
        counts = self._params.get("class_counts")
        is_index, target = check_inputs(self.name, logits, target, len(counts) if counts else None)
        x = logits.to(compute_dtype(logits))
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                total = self._total(x, target, is_index)
        else:
            total = self._total(x, target, is_index)
        return reduce(total, self._params["reduction"], logits.shape[0])

    def _total(self, x: torch.Tensor, target: torch.Tensor, is_index: bool) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def _dense_target(self, x: torch.Tensor, target: torch.Tensor, is_index: bool) -> torch.Tensor:
        return one_hot(target, x.shape[1], x.dtype) if is_index else target

    def _class_weights(self, x: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
        # Cached per device/dtype: the weights change only with the hyperparameters.
        key = (x.device, x.dtype, weights)
        cached = getattr(self, "_weight_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, torch.tensor(weights, dtype=x.dtype, device=x.device))
            self._weight_cache = cached
        return cached[1]


def _sample_weights(w: torch.Tensor, target: torch.Tensor, is_index: bool) -> torch.Tensor:
    """Per-sample weight: its class's weight (multi-hot: the sum over its classes, as Cui's code)."""
    return w[target] if is_index else target @ w


def effective_number_weights(counts: tuple[int, ...], beta: float) -> tuple[float, ...]:
    """Cui et al. 2019: w_j = (1 - beta) / (1 - beta^n_j), normalised to sum to C."""
    n = np.asarray(counts, dtype=np.float64)
    # 1 - beta^n computed as -expm1(n log beta): exact for beta close to 1.
    effective = -np.expm1(n * math.log(beta)) if beta > 0 else np.ones_like(n)
    w = (1.0 - beta) / effective
    return tuple(float(v) for v in w / w.sum() * len(n))


def _softmax_ce(x: torch.Tensor, target: torch.Tensor, is_index: bool) -> torch.Tensor:
    """Per-sample softmax cross-entropy; float targets: -sum_j y_j log softmax_j."""
    if is_index:
        return F.cross_entropy(x, target, reduction="none")
    return -(target * F.log_softmax(x, dim=1)).sum(dim=1)


def _sigmoid_focal(x: torch.Tensor, y: torch.Tensor, gamma: float,
                   alpha: float | None) -> torch.Tensor:
    """Per-element sigmoid focal loss; (1 - p)^g = exp(g * logsigmoid(-x)) keeps gradients finite."""
    pos = F.softplus(-x)  # -log p
    neg = F.softplus(x)  # -log(1 - p)
    if gamma > 0:
        pos = pos * torch.exp(gamma * F.logsigmoid(-x))
        neg = neg * torch.exp(gamma * F.logsigmoid(x))
    if alpha is not None:
        pos, neg = alpha * pos, (1.0 - alpha) * neg
    return y * pos + (1 - y) * neg


class _ReductionOnly(_Baseline):
    """A parameter-free baseline: `reduction` is its only setting."""

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__()
        self._configure(dict(reduction=reduction))

    def _validate(self, params: dict[str, Any]) -> dict[str, Any]:
        self._reduction(params)
        return params


class BCELoss(_ReductionOnly):
    """Binary cross-entropy on sigmoid outputs against one-hot targets (C independent binaries)."""

    name = "bce"

    def _total(self, x, target, is_index):
        return F.binary_cross_entropy_with_logits(x, self._dense_target(x, target, is_index),
                                                  reduction="sum")


class CELoss(_ReductionOnly):
    """Softmax cross-entropy (float targets: -sum_j y_j log softmax_j per sample)."""

    name = "ce"

    def _total(self, x, target, is_index):
        return _softmax_ce(x, target, is_index).sum()


class FocalLoss(_Baseline):
    """Sigmoid focal loss (Lin et al. 2017), alpha-balanced.

    Per element: y * alpha * (1 - p)^gamma * (-log p) + (1 - y) * (1 - alpha) * p^gamma * (-log(1 - p)).
    ``alpha=None`` drops the balancing (both sides weigh 1), as torchvision's ``alpha < 0``.
    """

    name = "focal"

    @classmethod
    def search_space(cls) -> dict[str, Param]:
        """gamma in [0, 5] (Lin et al.'s Table 1 varies it over 0..5); alpha in [0.1, 0.9] or none."""
        return {"gamma": Real(0.0, 5.0), "alpha": Real(0.1, 0.9, optional=True)}

    @classmethod
    def paper_points(cls) -> list[dict[str, Any]]:
        return [{"gamma": 2.0, "use_alpha": True, "alpha": 0.25}]

    @classmethod
    def paper_setting(cls) -> dict[str, Any]:
        return {"gamma": 2.0, "alpha": 0.25}

    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0, reduction: str = "sum") -> None:
        super().__init__()
        self._configure(dict(alpha=alpha, gamma=gamma, reduction=reduction))

    def _validate(self, params: dict[str, Any]) -> dict[str, Any]:
        if params["alpha"] is not None:
            self._real(params, "alpha", low=0.0, high=1.0)
        self._real(params, "gamma", low=0.0)
        self._reduction(params)
        return params

    def _total(self, x, target, is_index):
        y = self._dense_target(x, target, is_index)
        return _sigmoid_focal(x, y, self._params["gamma"], self._params["alpha"]).sum()


class ASLLoss(_Baseline):
    """Asymmetric loss (Ridnik et al. 2021), the official code's definition.

    With p = sigmoid(x) and q = min(1 - p + clip, 1) (q = 1 - p when clip = 0), per element:
    -[y * log(max(p, eps)) * (1 - p)^gamma_pos + (1 - y) * log(max(q, eps)) * (1 - q)^gamma_neg].
    Logs are taken as logsigmoid and powers in log space (or guarded at 0), so the values
    equal the official code's while gradients stay finite for fractional gammas.
    ``detach_weight=True`` reproduces the official ``disable_torch_grad_focal_loss`` (no
    gradient through the focusing weight); the default differentiates the loss as written.
    """

    name = "asl"

    @classmethod
    def search_space(cls) -> dict[str, Param]:
        """Around the paper's setting (gamma_pos 0, gamma_neg 4, clip 0.05): [0, 2], [0, 6], [0, 0.2]."""
        return {"gamma_pos": Real(0.0, 2.0), "gamma_neg": Real(0.0, 6.0), "clip": Real(0.0, 0.2)}

    @classmethod
    def paper_points(cls) -> list[dict[str, Any]]:
        return [{"gamma_pos": 0.0, "gamma_neg": 4.0, "clip": 0.05}]

    @classmethod
    def paper_setting(cls) -> dict[str, Any]:
        """The paper's MS-COCO setting (gamma_pos 0; the official class defaults to 1)."""
        return {"gamma_pos": 0.0, "gamma_neg": 4.0, "clip": 0.05}

    def __init__(self, gamma_pos: float = 1.0, gamma_neg: float = 4.0, clip: float = 0.05,
                 eps: float = 1e-8, detach_weight: bool = False, reduction: str = "sum") -> None:
        super().__init__()
        self._configure(dict(gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip, eps=eps,
                             detach_weight=detach_weight, reduction=reduction))

    def _validate(self, params: dict[str, Any]) -> dict[str, Any]:
        self._real(params, "gamma_pos", low=0.0)
        self._real(params, "gamma_neg", low=0.0)
        self._real(params, "clip", low=0.0, high=1.0, high_open=True)
        self._real(params, "eps", low=0.0, high=1.0, low_open=True, high_open=True)
        if not isinstance(params["detach_weight"], bool):
            raise self._error(f"detach_weight must be true or false, got {params['detach_weight']!r}")
        self._reduction(params)
        return params

    def _total(self, x, target, is_index):
        gp, gn, m, eps = (self._params[k] for k in ("gamma_pos", "gamma_neg", "clip", "eps"))
        y = self._dense_target(x, target, is_index)
        log_eps = math.log(eps)
        log_p = F.logsigmoid(x).clamp(min=log_eps)  # log(max(p, eps))
        if m > 0:
            p = torch.sigmoid(x)
            log_q = torch.log((1 - p + m).clamp(max=1).clamp(min=eps))
            pm = (p - m).clamp(min=0)  # 1 - q
            live = pm > 0
            w_neg = torch.where(live, torch.exp(gn * torch.log(torch.where(live, pm, 1.0))),
                                1.0 if gn == 0 else 0.0)
        else:
            log_q = F.logsigmoid(-x).clamp(min=log_eps)
            w_neg = torch.exp(gn * F.logsigmoid(x))
        w_pos = torch.exp(gp * F.logsigmoid(-x))
        if self._params["detach_weight"]:
            w_pos, w_neg = w_pos.detach(), w_neg.detach()
        return -(y * log_p * w_pos + (1 - y) * log_q * w_neg).sum()


class ClassBalancedLoss(_Baseline):
    """Class-balanced loss (Cui et al. 2019): a base loss weighted by the inverse effective number.

    Each sample is weighted by w_y = (1 - beta) / (1 - beta^n_y), normalised so the C class
    weights sum to C (as the authors' code). ``base``: "ce" (softmax), "bce" (sigmoid) or
    "focal" (sigmoid focal with ``gamma``, no alpha: the weight replaces it).
    """

    name = "cb"
    _needs_counts = True
    BASES = ("ce", "bce", "focal")

    @classmethod
    def search_space(cls) -> dict[str, Param]:
        """beta in [0.9, 0.9999] searched as log(1 - beta) (the paper's grid is 0.9, 0.99,
        0.999, 0.9999); the base loss; gamma in [0, 5] when the base is focal."""
        return {"beta": Real(1e-4, 0.1, log=True, complement=True), "base": Choice(cls.BASES),
                "gamma": Real(0.0, 5.0, when=("base", ("focal",)))}

    @classmethod
    def paper_points(cls) -> list[dict[str, Any]]:
        return [{"one_minus_beta": 1e-4, "base": "ce"}]

    @classmethod
    def paper_setting(cls) -> dict[str, Any]:
        return {"beta": 0.9999, "base": "ce"}

    def __init__(self, class_counts: Any = None, beta: float = 0.9999, base: str = "ce",
                 gamma: float = 2.0, reduction: str = "sum") -> None:
        super().__init__()
        self._configure(dict(class_counts=class_counts, beta=beta, base=base, gamma=gamma,
                             reduction=reduction))

    def _validate(self, params: dict[str, Any]) -> dict[str, Any]:
        counts = self._class_counts(params)
        beta = self._real(params, "beta", low=0.0, high=1.0, high_open=True)
        self._choice(params, "base", self.BASES)
        self._real(params, "gamma", low=0.0)
        self._reduction(params)
        self.class_weights = effective_number_weights(counts, beta)
        return params

    def _total(self, x, target, is_index):
        w = _sample_weights(self._class_weights(x, self.class_weights), target, is_index)
        base = self._params["base"]
        if base == "ce":
            per_sample = _softmax_ce(x, target, is_index)
        else:
            gamma = self._params["gamma"] if base == "focal" else 0.0
            y = self._dense_target(x, target, is_index)
            per_sample = _sigmoid_focal(x, y, gamma, None).sum(dim=1)
        return (w * per_sample).sum()


class LDAMLoss(_Baseline):
    """LDAM (Cao et al. 2019): softmax CE of s * (x - margin at the true class), x cosines.

    Margins m_j = C / n_j^(1/4) with C chosen so the largest is ``max_m``. The margins and the
    scale ``s`` are defined on a cosine classifier: ``x`` must lie in [-1, 1], so the model
    needs :class:`alpa_tune.models.NormedLinear` (``head = "cosine"``; training builds it). On a
    linear head's unbounded logits, s = 30 saturates the softmax and a margin of 0.5 is
    small against them: training is erratic (digits-lt, 10 epochs, 3 seeds: 64.9 ± 13.5 %
    held-out balanced accuracy on the linear head, 91.3 ± 5.5 % on the cosine one, 96.6 ± 2.7 %
    with training.scheduler = "cosine"; DRW there: 85.1 ± 1.6 % at a constant LR, 96.4 ± 2.6 %
    with the cosine schedule).

    Re-weighting by the effective number (Cui et al., ``beta``): ``reweight=True`` applies it
    from the start; ``drw=True`` is the paper's deferred re-weighting (DRW): uniform weights,
    then the weights from epoch ceil(``drw_start`` * total epochs), told by :meth:`set_epoch`
    (the paper: 160 of 200, drw_start = 0.8). The paper pairs DRW with a decaying learning rate
    (training.scheduler = "cosine" here). The reference averages with weights; here "sum" sums
    w_y * CE_i and "mean" divides by N.
    """

    name = "ldam"
    head = "cosine"
    _needs_counts = True

    @classmethod
    def search_space(cls) -> dict[str, Param]:
        """max_m in [0.1, 1] around the paper's 0.5; the logit scale s in [5, 50] around its 30."""
        return {"max_m": Real(0.1, 1.0), "s": Real(5.0, 50.0)}

    @classmethod
    def paper_points(cls) -> list[dict[str, Any]]:
        return [{"max_m": 0.5, "s": 30.0}]

    @classmethod
    def paper_setting(cls) -> dict[str, Any]:
        return {"max_m": 0.5, "s": 30.0}

    def __init__(self, class_counts: Any = None, max_m: float = 0.5, s: float = 30.0,
                 reweight: bool = False, drw: bool = False, drw_start: float = 0.8,
                 beta: float = 0.9999, reduction: str = "sum") -> None:
        super().__init__()
        self.epoch, self.total_epochs = 0, None
        self._configure(dict(class_counts=class_counts, max_m=max_m, s=s, reweight=reweight, drw=drw,
                             drw_start=drw_start, beta=beta, reduction=reduction))

    def _validate(self, params: dict[str, Any]) -> dict[str, Any]:
        counts = self._class_counts(params)
        max_m = self._real(params, "max_m", low=0.0, low_open=True)
        self._real(params, "s", low=0.0, low_open=True)
        beta = self._real(params, "beta", low=0.0, high=1.0, high_open=True)
        self._real(params, "drw_start", low=0.0, high=1.0)
        for key in ("reweight", "drw"):
            if not isinstance(params[key], bool):
                raise self._error(f"{key} must be true or false, got {params[key]!r}")
        if params["reweight"] and params["drw"]:
            raise self._error("reweight (weights from the start) and drw (deferred weights) exclude each other")
        self._reduction(params)
        raw = 1.0 / np.sqrt(np.sqrt(np.asarray(counts, dtype=np.float64)))
        self.margins = tuple(float(v) for v in raw * (max_m / raw.max()))
        self.drw_weights = effective_number_weights(counts, beta)
        return params

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """Tell the loss where training is (deferred re-weighting switches on at :meth:`drw_epoch`)."""
        self.epoch, self.total_epochs = int(epoch), int(total_epochs)

    def drw_epoch(self, total_epochs: int) -> int:
        """The first re-weighted epoch (0-based) of ``total_epochs``: ceil(drw_start * total)."""
        # The tolerance keeps 0.8 * 10 at 8 whatever the float rounding of the product.
        return math.ceil(self._params["drw_start"] * total_epochs - 1e-9)

    @property
    def reweighting(self) -> bool:
        """Whether the effective-number class weights apply now."""
        if self._params["reweight"]:
            return True
        return (self._params["drw"] and self.total_epochs is not None
                and self.epoch >= self.drw_epoch(self.total_epochs))

    def _total(self, x, target, is_index):
        margins = torch.tensor(self.margins, dtype=x.dtype, device=x.device)
        y = self._dense_target(x, target, is_index)
        shifted = self._params["s"] * (x - y * margins)  # margin only at the true class
        per_sample = _softmax_ce(shifted, target, is_index)
        if self.reweighting:
            per_sample = per_sample * _sample_weights(self._class_weights(x, self.drw_weights),
                                                      target, is_index)
        return per_sample.sum()
