"""ALPA (Asymmetric Loss with Padé Approximation) as a loss module: exact, finite, fused.

Per element, with p = sigmoid(x), s = 1 - p, clip m, q = min(s + m, 1), p_m = max(p - m, 0)
(design.md section 3):

    "reference" (paper eq. 11 as the authors' code computes it, the default)
        y = 1:  1.5 * alpha * q**gamma_pos * s**(gamma_pos + 1)
        y = 0:  beta * p**gamma_neg * p_m**(gamma_neg + 1)
    "single" (the form of the paper's gradient analysis)
        y = 1:  1.5 * alpha * s**(gamma_pos + 1)
        y = 0:  beta * p_m**(gamma_neg + 1)
    variant "hill" multiplies the y = 0 term by (hill_lambda - p).

The forward pass evaluates these closed forms and their analytic derivatives together
(:mod:`._alpa_kernels`); a custom autograd function saves d loss / d logits, so backward is one
multiply. Hyperparameters are plain floats (or one tensor under torch.compile), never constants
baked into code, so a new trial's values cost nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from alpa_tune.space import Choice, Param, Real

from . import _alpa_kernels as K
from ._alpa_kernels import compile_enabled
from ._base import TunableLoss, check_inputs

FOCUSINGS = ("reference", "single")
VARIANTS = ("plain", "hill")
_EXACT = (torch.float32, torch.float64)


# -- autograd ------------------------------------------------------------------------------------

class _FusedALPA(torch.autograd.Function):
    """Loss value forward; the gradient computed with it is saved, so backward is one multiply."""

    @staticmethod
    def forward(ctx, logits, target, loss_module, is_index, scale):  # noqa: D102
        total, grad, grad_scale = loss_module._evaluate(logits, target, is_index, True, scale)
        ctx.save_for_backward(grad)
        ctx.grad_scale, ctx.in_dtype = grad_scale, logits.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        if torch.is_grad_enabled():  # create_graph=True: the saved gradient is a constant
            raise RuntimeError("alpa-tune: the fused ALPA loss supports first derivatives only")
        (grad,) = ctx.saved_tensors
        scale = ctx.grad_scale  # None for reduction "sum": the saved gradient is in final units
        g = torch.mul(grad, grad_output if scale is None else grad_output * scale)
        return (g if g.dtype == ctx.in_dtype else g.to(ctx.in_dtype)), None, None, None, None


class ALPALoss(TunableLoss):
    """ALPA loss, fused forward/backward; hyperparameters changeable with :meth:`set_params`.

    Defaults are the paper's tuned "Loss v2" (alpha 0.875, beta 1.625, gamma_pos 0,
    gamma_neg 4) with clip 0.05 and the "reference" focusing the paper's results used.

    Args:
        alpha: weight of the positive term (> 0).
        beta: weight of the negative term (> 0).
        gamma_pos: focusing exponent for positives (>= 0, fractional allowed).
        gamma_neg: focusing exponent for negatives (>= 0, fractional allowed).
        clip: probability margin m in [0, 1) shifted off the negatives (0 disables).
        focusing: "reference" (eq. 11: the focusing weight applied twice, as the authors'
            code does) or "single" (applied once, as in the paper's gradient analysis).
        variant: "plain", or "hill" (the paper's Loss v3: negatives times ``hill_lambda - p``).
        hill_lambda: Hill's lambda (>= 1 keeps the negative term non-negative).
        reduction: "sum" over all N x C elements (the reference) or "mean" (sum / N).
    """

    name = "alpa"
    # The trial's `variant` stores a registered name; the registry's alias says what it fixes.
    VARIANT_NAMES = ("alpa", "alpa_hill")

    @classmethod
    def search_space(cls) -> dict[str, Param]:
        """The paper's ranges (section 6.1), with today's trial names: alpha, beta, gamma_pos,
        gamma_neg, variant ("alpa" / "alpa_hill"); clip, focusing, hill_lambda are set, not tuned."""
        from ._registry import alias_params  # deferred: the registry module imports the losses' base

        variants = tuple({"variant": "plain", **alias_params(n)} for n in cls.VARIANT_NAMES)
        return {"alpha": Real(0.5, 2.0), "beta": Real(0.5, 2.0),
                "gamma_pos": Real(0.0, 5.0), "gamma_neg": Real(0.0, 5.0),
                "variant": Choice(cls.VARIANT_NAMES, kwargs=variants)}

    @classmethod
    def paper_points(cls) -> list[dict[str, Any]]:
        """The paper's three settings (section 6.1): Loss v1, v2 (the reported ALPA), v3 (Hill)."""
        return [
            {"alpha": 1.0, "beta": 1.0, "gamma_pos": 0.0, "gamma_neg": 4.0, "variant": "alpa"},
            {"alpha": 0.875, "beta": 1.625, "gamma_pos": 0.0, "gamma_neg": 4.0, "variant": "alpa"},
            {"alpha": 1.25, "beta": 2.0, "gamma_pos": 3.0, "gamma_neg": 2.0, "variant": "alpa_hill"},
        ]

    @classmethod
    def paper_setting(cls) -> dict[str, Any]:
        """Loss v2, the setting the paper reports (the constructor's defaults)."""
        return {"alpha": 0.875, "beta": 1.625, "gamma_pos": 0.0, "gamma_neg": 4.0,
                "clip": 0.05, "variant": "plain"}

    def __init__(self, alpha: float = 0.875, beta: float = 1.625, gamma_pos: float = 0.0,
                 gamma_neg: float = 4.0, clip: float = 0.05, focusing: str = "reference",
                 variant: str = "plain", hill_lambda: float = 1.5, reduction: str = "sum") -> None:
        super().__init__()
        self._use_compile: dict[str, bool] = {}
        self._configure(dict(alpha=alpha, beta=beta, gamma_pos=gamma_pos, gamma_neg=gamma_neg,
                             clip=clip, focusing=focusing, variant=variant,
                             hill_lambda=hill_lambda, reduction=reduction))

    def _validate(self, params: dict[str, Any]) -> dict[str, Any]:
        for key in ("alpha", "beta"):
            self._real(params, key, low=0.0, low_open=True)
        for key in ("gamma_pos", "gamma_neg"):
            self._real(params, key, low=0.0)
        self._real(params, "clip", low=0.0, high=1.0, high_open=True)
        self._real(params, "hill_lambda", low=1.0)
        self._choice(params, "focusing", FOCUSINGS)
        self._choice(params, "variant", VARIANTS)
        self._reduction(params)
        return params

    def _params_changed(self) -> None:
        consts, static = K.constants(self._params)
        self._set(_consts=consts, _static=static, _last=None,
                  _scale_sum=self._params["reduction"] == "sum")

    def _evaluate(self, logits: torch.Tensor, target: torch.Tensor, is_index: bool,
                  need_grad: bool, scale: float):
        """(total, gradient or None, the gradient's scale: None for 1, else a float)."""
        # No detach: this runs under no_grad (autograd.Function.forward) or on logits that
        # record no graph, and the kernels never write into x.
        x = logits
        if x.dtype not in _EXACT:  # half precision computes in float32 (see _base.compute_dtype)
            x = x.float()
        last = self._last
        if last is None or last[1] is not x.dtype or last[0] != x.device:
            last = self._plan(x)
        ops = last[2]
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                total, grad = self._kernel(x, target, is_index, need_grad, ops, last[3])
        else:
            total, grad = self._kernel(x, target, is_index, need_grad, ops, last[3])
        if scale == 1.0:
            return total.mul_(ops.hk), grad, None
        return total.mul_(ops.hk).mul_(scale), grad, scale

    def _plan(self, x: torch.Tensor) -> tuple:
        """Constants for x's device and dtype, and whether to compile (kept for the next call)."""
        use_compile = self._use_compile.get(x.device.type)
        if use_compile is None:  # decided once per device (reading the environment is slow)
            use_compile = self._use_compile[x.device.type] = compile_enabled(x.device)
        ops = K.operands(self._consts, x.dtype, x.device)
        kt = K.compiled_tensor(self._consts, x.dtype, x.device) if use_compile else None
        self._set(_last=(x.device, x.dtype, ops, kt))
        return self._last

    def _kernel(self, x: torch.Tensor, target: torch.Tensor, is_index: bool, need_grad: bool,
                ops: K.Operands, kt: torch.Tensor | None):
        if kt is not None and not K.compile_failed():
            out = K.run_compiled(is_index, x, target, kt, self._static, need_grad)
            if out is not None:
                return out
        kernel = K.index_kernel if is_index else K.dense_kernel
        return kernel(x, target, self._consts, ops, self._static, need_grad)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` (N, C) against int64 indices (N,) or float one/multi-hot (N, C).

        Returns a 0-d tensor in float32 (float64 for float64 logits).
        """
        if target.dtype == torch.int64 and target.dim() == 1 and logits.dim() == 2 \
                and logits.is_floating_point() and target.shape[0] == logits.shape[0]:
            is_index = True  # the training loop's case, checked without the general path
        else:
            is_index, target = check_inputs(self.name, logits, target)
        scale = 1.0 if self._scale_sum else 1.0 / max(logits.shape[0], 1)
        if logits.requires_grad and torch.is_grad_enabled():
            return _FusedALPA.apply(logits, target, self, is_index, scale)
        return self._evaluate(logits, target, is_index, False, scale)[0]


def alpa_unfused(logits: torch.Tensor, target: torch.Tensor, alpha: float, beta: float,
                 gamma_pos: float, gamma_neg: float, clip: float = 0.05,
                 focusing: str = "reference", variant: str = "plain",
                 hill_lambda: float = 1.5) -> torch.Tensor:
    """The authors' unfused sequence of operations, for comparison only (not finite everywhere).

    ``target`` is a float one-hot (N, C). Sigmoid, clip, the Padé [1/1] terms, the asymmetric
    focusing factors, then eq. 11's sample weight as a separate power; autograd differentiates.
    """
    y = target
    xs_pos = torch.sigmoid(logits)
    xs_neg = 1 - xs_pos
    if clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    a0, a1, b1, c0, c1, d1 = -1.5, 1.5, 0.0, -1.0, 1.0, 0.0
    los_pos = y * (a0 + a1 * xs_pos) / (1 + b1 * xs_pos)
    los_neg = (1 - y) * (c0 + c1 * xs_neg) / (1 + d1 * xs_neg)
    if variant == "hill":
        los_neg = los_neg * (hill_lambda - xs_pos)
    if focusing == "reference":
        loss = alpha * torch.pow(xs_neg, gamma_pos) * los_pos + beta * torch.pow(xs_pos, gamma_neg) * los_neg
    else:
        loss = alpha * los_pos + beta * los_neg
    pt = xs_pos * y + xs_neg * (1 - y)
    gamma = gamma_pos * y + gamma_neg * (1 - y)
    loss = loss * torch.pow(1 - pt, gamma)
    return -loss.sum()
