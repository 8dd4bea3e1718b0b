"""ALPA (Asymmetric Loss with Padé Approximation): exact, finite in every dtype, and fused.

Per element, with p = sigmoid(x), s = 1 - p, clip m, q = min(s + m, 1), p_m = max(p - m, 0)
(design.md section 3):

    "reference" (paper eq. 11 as the authors' code computes it, the default)
        y = 1:  1.5 * alpha * q**gamma_pos * s**(gamma_pos + 1)
        y = 0:  beta * p**gamma_neg * p_m**(gamma_neg + 1)
    "single" (the form of the paper's gradient analysis)
        y = 1:  1.5 * alpha * s**(gamma_pos + 1)
        y = 0:  beta * p_m**(gamma_neg + 1)
    variant "hill" multiplies the y = 0 term by (hill_lambda - p).

The fused path evaluates these closed forms and their analytic derivatives in one forward pass
(a custom autograd function saves d loss / d logits; backward is a single multiply). Powers are
taken in log space, which keeps everything finite where a naive ``p ** gamma`` is not:

* the negative term is written ``p_m * (p * p_m)**gamma_neg``; the power is
  ``exp2(gamma_neg * log2(p * p_m))`` with gamma_neg floored at 1e-30, so it is exactly 0 where
  p_m = 0 (no ``0 * -inf``) yet exactly 1 elsewhere when gamma_neg = 0 - which also supplies
  the kink's indicator 1{p > m} that the derivative needs;
* the positive term uses log(1 - p) = logsigmoid(-x), exact for any finite logit, so it
  neither underflows to log(0) nor loses the tail when sigmoid rounds to 1;
* derivatives are products of bounded factors (no ``gamma * p**(gamma - 1)``), so
  fractional gammas at p = 0 give finite gradients.

For integer class-index targets the negative form runs over all N x C elements and the positive
form only over the N gathered target logits, which then overwrite their slots: about half the
transcendental work of evaluating both forms everywhere.

Hyperparameters enter as plain floats (eager) or as one tensor (compiled), never as constants
baked into code, so a new trial's values cost nothing and never recompile.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from ._base import TunableLoss, check_inputs, compute_dtype

FOCUSINGS = ("reference", "single")
VARIANTS = ("plain", "hill")
# gamma_neg floor in the exponent: 1e-30 * log2(w) rounds to 0 for any w > 0 that float32
# can hold (|log2 w| < 150), yet turns log2(0) = -inf into -inf instead of nan.
_GAMMA_FLOOR = 1e-30


class _Consts(NamedTuple):
    """Derived constants of one hyperparameter setting (floats eager, 0-d tensors compiled)."""

    m: Any  # clip
    gn_eff: Any  # max(gamma_neg, floor): exponent of (p * p_m) or of p_m
    na: Any  # negative gradient: factor of p_m ("reference") or of p ("single")
    nb: Any  # negative gradient: additive term (reference focusing with clip only)
    beta: Any
    lam: Any  # hill lambda
    pg: Any  # exponent of q in the positive term
    pe: Any  # exponent of (1 - p) in the positive term
    plogc: Any  # log(1.5 * alpha / beta): positives are computed in units of beta
    npr: Any  # positive gradient: -beta * gamma_pos, factor of s / q
    npc: Any  # positive gradient: constant part


@dataclass(frozen=True)
class _Static:
    """Structural choices: these select code paths (and compiled graphs), not values."""

    clipped: bool
    reference: bool
    hill: bool


def _consts(p: dict[str, Any]) -> tuple[_Consts, _Static]:
    a, b, gp, gn, m = p["alpha"], p["beta"], p["gamma_pos"], p["gamma_neg"], p["clip"]
    ref, clipped = p["focusing"] == "reference", m > 0
    if ref:
        # d/dx [p^g p_m^(g+1)] = s (p p_m)^g (g p_m + (g+1) p), and p = p_m + m wherever p_m > 0.
        na, nb = b * (2 * gn + 1), b * (gn + 1) * m
        pe = gp + 1 if clipped else 2 * gp + 1  # without clip q = s: one power of s
    else:
        na, nb, pe = b * (gn + 1), 0.0, gp + 1
    npc = -b * pe if not (ref and clipped) else -b * (gp + 1)
    consts = _Consts(m=m, gn_eff=max(gn, _GAMMA_FLOOR), na=na, nb=nb, beta=b, lam=p["hill_lambda"],
                     pg=gp, pe=pe, plogc=math.log(1.5 * a / b), npr=-b * gp, npc=npc)
    return consts, _Static(clipped=clipped, reference=ref, hill=p["variant"] == "hill")


# -- kernels: closed forms and their derivatives -------------------------------------------------
# Each returns (loss / beta per element, d loss / d x per element or None). They take any shape.

def _negative(x: torch.Tensor, k: _Consts, st: _Static, need_grad: bool):
    p = torch.sigmoid(x)
    pm = torch.sub(p, k.m).clamp_(min=0) if st.clipped else p
    # reference: p^g p_m^(g+1) = p_m (p p_m)^g ; single: p_m^(g+1) = p_m p_m^g
    h = torch.mul(p, pm) if st.reference else torch.clone(pm)
    h = h.log2_().mul_(k.gn_eff).exp2_()
    loss = torch.mul(h, pm)
    if not need_grad:
        if st.hill:
            loss.mul_(torch.rsub(p, k.lam))
        return loss, None
    t = torch.mul(pm if st.reference else p, k.na)
    if st.reference and st.clipped:
        t.add_(k.nb)
    s = torch.rsub(p, 1.0)
    grad = t.mul_(h).mul_(s)
    if st.hill:  # d/dx [l (lam - p)] = dl/dx (lam - p) - l p s
        lam_p = torch.rsub(p, k.lam)
        grad.mul_(lam_p).sub_(p.mul_(s).mul_(loss).mul_(k.beta))
        loss.mul_(lam_p)
    return loss, grad


def _positive(x: torch.Tensor, k: _Consts, st: _Static, need_grad: bool):
    ls = F.logsigmoid(-x)  # log(1 - p)
    if st.reference and st.clipped:
        s = torch.exp(ls)
        # The floor matters only for a clip below the dtype's range, where s + m can round to 0.
        q = torch.add(s, k.m).clamp_(min=torch.finfo(s.dtype).tiny, max=1.0)
        e = torch.log(q).mul_(k.pg).add_(ls.mul_(k.pe))
    else:
        e = ls.mul_(k.pe)
    loss = e.add_(k.plogc).exp_()
    if not need_grad:
        return loss, None
    p = torch.sigmoid(x)
    if st.reference and st.clipped:  # q's derivative is -p s while unclamped, 0 once q = 1
        f = torch.where(q < 1, s / q, 0.0).mul_(k.npr).add_(k.npc)
        grad = f.mul_(p).mul_(loss)
    else:
        grad = p.mul_(k.npc).mul_(loss)
    return loss, grad


def _index_kernel(x: torch.Tensor, index: torch.Tensor, k: _Consts, st: _Static, need_grad: bool):
    loss, grad = _negative(x, k, st, need_grad)
    col = index.unsqueeze(1)
    pos_loss, pos_grad = _positive(x.gather(1, col), k, st, need_grad)
    total = loss.scatter_(1, col, pos_loss).sum().mul_(k.beta)
    if need_grad:
        grad.scatter_(1, col, pos_grad)
    return total, grad


def _dense_kernel(x: torch.Tensor, y: torch.Tensor, k: _Consts, st: _Static, need_grad: bool):
    # y * l+ + (1 - y) * l-; lerp returns either end exactly for y in {0, 1}.
    neg_loss, neg_grad = _negative(x, k, st, need_grad)
    pos_loss, pos_grad = _positive(x, k, st, need_grad)
    total = torch.lerp(neg_loss, pos_loss, y).sum().mul_(k.beta)
    return total, (torch.lerp(neg_grad, pos_grad, y) if need_grad else None)


# -- optional torch.compile ----------------------------------------------------------------------

def _index_entry(x, index, kt, st, need_grad):
    return _index_kernel(x, index, _Consts(*kt.unbind(0)), st, need_grad)


def _dense_entry(x, y, kt, st, need_grad):
    return _dense_kernel(x, y, _Consts(*kt.unbind(0)), st, need_grad)


_compiled: dict[bool, Any] = {}
_compile_failed = False


def compile_enabled(device: torch.device) -> bool:
    """Whether the fused kernel goes through torch.compile on this device.

    ``ALPA_TUNE_NO_COMPILE=1`` turns compilation off everywhere; ``ALPA_TUNE_COMPILE=1`` turns
    it on for CPU too. By default only CUDA compiles: there one generated kernel replaces a few
    dozen launches, while on CPU the eager fused path is already within 2x of BCE and a CPU
    compile costs tens of seconds per process.
    """
    if _compile_failed or os.environ.get("ALPA_TUNE_NO_COMPILE", "0") not in ("", "0"):
        return False
    if os.environ.get("ALPA_TUNE_COMPILE", "0") not in ("", "0"):
        return True
    return device.type == "cuda"


def _run_compiled(is_index: bool, x, target, kt, st, need_grad):
    global _compile_failed
    fn = _compiled.get(is_index)
    if fn is None:
        # dynamic=True: the last, smaller batch of an epoch must not trigger a recompile.
        fn = _compiled[is_index] = torch.compile(_index_entry if is_index else _dense_entry,
                                                 dynamic=True, fullgraph=True)
    try:
        return fn(x, target, kt, st, need_grad)
    except Exception as exc:  # compiler missing or failing: the eager path computes the same
        _compile_failed = True
        warnings.warn(f"alpa-tune: torch.compile of the ALPA kernel failed ({type(exc).__name__}: "
                      f"{exc}); using the eager fused kernel", RuntimeWarning, stacklevel=3)
        return None


# -- autograd ------------------------------------------------------------------------------------

class _FusedALPA(torch.autograd.Function):
    """Loss value forward; the gradient computed with it is saved, so backward is one multiply."""

    @staticmethod
    def forward(ctx, logits, target, loss_module, is_index, scale):  # noqa: D102
        total, grad = loss_module._evaluate(logits, target, is_index, True)
        ctx.save_for_backward(grad)
        ctx.scale, ctx.in_dtype = scale, logits.dtype
        return total if scale == 1.0 else total.mul_(scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # noqa: D102
        (grad,) = ctx.saved_tensors
        factor = grad_output if ctx.scale == 1.0 else grad_output * ctx.scale
        return torch.mul(grad, factor).to(ctx.in_dtype), None, None, None, None


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

    def __init__(self, alpha: float = 0.875, beta: float = 1.625, gamma_pos: float = 0.0,
                 gamma_neg: float = 4.0, clip: float = 0.05, focusing: str = "reference",
                 variant: str = "plain", hill_lambda: float = 1.5, reduction: str = "sum") -> None:
        super().__init__()
        self._kt: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
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
        self._consts, self._static = _consts(self._params)
        self._kt.clear()

    def _evaluate(self, logits: torch.Tensor, target: torch.Tensor, is_index: bool,
                  need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = logits.detach().to(compute_dtype(logits))
        device = x.device
        if torch.is_autocast_enabled(device.type):
            with torch.autocast(device.type, enabled=False):
                return self._evaluate_fp(x, target, is_index, need_grad)
        return self._evaluate_fp(x, target, is_index, need_grad)

    def _evaluate_fp(self, x, target, is_index, need_grad):
        if compile_enabled(x.device):
            key = (x.device, x.dtype)
            kt = self._kt.get(key)
            if kt is None:
                kt = self._kt[key] = torch.tensor(self._consts, dtype=x.dtype, device=x.device)
            out = _run_compiled(is_index, x, target, kt, self._static, need_grad)
            if out is not None:
                return out
        kernel = _index_kernel if is_index else _dense_kernel
        return kernel(x, target, self._consts, self._static, need_grad)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` (N, C) against int64 indices (N,) or float one/multi-hot (N, C).

        Returns a 0-d tensor in float32 (float64 for float64 logits).
        """
        is_index, target = check_inputs(self.name, logits, target)
        scale = 1.0 if self._params["reduction"] == "sum" else 1.0 / max(logits.shape[0], 1)
        if logits.requires_grad and torch.is_grad_enabled():
            return _FusedALPA.apply(logits, target, self, is_index, scale)
        total, _ = self._evaluate(logits, target, is_index, False)
        return total if scale == 1.0 else total.mul_(scale)


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
