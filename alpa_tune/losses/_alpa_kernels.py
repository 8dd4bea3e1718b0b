"""ALPA's fused kernels: the closed-form loss and its derivative in one forward pass.

Per element, with p = sigmoid(x), s = 1 - p, clip m, q = min(s + m, 1), p_m = max(p - m, 0):

    reference:  y = 1: 1.5 alpha q^gp s^(gp+1)        y = 0: beta p^gn p_m^(gn+1)
    single:     y = 1: 1.5 alpha s^(gp+1)             y = 0: beta p_m^(gn+1)
    hill:       the y = 0 term times (lambda - p)

Powers are taken in log space, ``exp2(g * log2(base))``, and derivatives are written as products
of bounded factors (never ``g * p**(g - 1)``), so fractional gammas, p = 0, p = 1 and logits of
any size give finite values and gradients:

* negatives: ``p^g p_m^(g+1) = p_m (p p_m)^g``. The power's base is ``p p_m + eps``, eps a
  normal number far below the dtype's resolution, so log2 never sees 0 or a subnormal (on CPU
  those take a scalar slow path, 10-40x slower, and most negatives of a trained model sit at
  p <= m). Where p_m = 0 the base is eps exactly and a threshold sends its log to -inf: the
  power is then exactly 0 there, which is the kink's indicator 1{p > m} the derivative needs;
* positives: ``log(1 - p) = -softplus(x)``, exact for any finite logit, so the loss keeps its
  tail where sigmoid rounds to 1;
* gamma_neg is floored at 1e-30 in the exponent so that ``0 * log2(0)`` cannot make a NaN.

For int64 class indices the negative form runs over all N x C elements and the positive form only
over the N target logits, whose slots it then overwrites: about half the transcendental work of
evaluating both forms everywhere. Losses are carried in units of beta / na (na, the negative
gradient's scale) and gradients in absolute units: the negative power is evaluated as
``exp2(ge * log2(base) + log2(na))``, so na rides in the affine step before exp2 that the power
needs anyway, and the positive term's constant includes log(na). The caller scales the sum by
beta / na; backward only multiplies by grad_output. No pass over the (N, C) tensor is spent on
units.

Eager, constants that fused ops take as numbers (``alpha=``, ``value=``, clamp bounds) are Python
floats and the others 0-d tensors; under torch.compile all are 0-d tensors, so new hyperparameter
values never recompile.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

# 1e-30 * log2(w) rounds to 0 for every w > 0 a float can hold, yet 1e-30 * -inf stays -inf.
_GAMMA_FLOOR = 1e-30
# Clips below this act as 0: the difference is below 1e-30 per element, and m stays a normal
# float32 number (q >= m must not round to 0).
_CLIP_FLOOR = 1e-30
# Per compute dtype, log2 of eps: far below the dtype's resolution for every genuine p p_m
# (at least about m * ulp(m)), yet a normal number.
_EPS_LOG2 = {torch.float32: -60.0, torch.float64: -200.0}


class Consts(NamedTuple):
    """Derived constants of one hyperparameter setting (floats eager, 0-d tensors compiled)."""

    m: Any  # clip (0 when below _CLIP_FLOOR)
    ge: Any  # multiplies log2 of the negative power's base: gamma_neg (floored), doubled for p^2
    nc: Any  # reference with clip: the gradient's p_m-free term, relative to the p_m term
    hk: Any  # beta / na: converts loss units (beta / na) into absolute units
    lam: Any  # hill lambda
    pg: Any  # exponent of q in the positive term
    pe: Any  # exponent of (1 - p) in the positive term
    plogc: Any  # log(1.5 alpha na / beta): the positive term's constant, in units of beta / na
    npr: Any  # positive gradient: coefficient of s / q (times loss units: absolute)
    npc: Any  # positive gradient: constant coefficient (times loss units: absolute)
    beta: Any  # loss unit
    na: Any  # the negative gradient's scale
    lna: Any  # log2(na): added to the negative power's exponent


@dataclass(frozen=True)
class Static:
    """Structural choices: they select code paths (and compiled graphs), not values."""

    clipped: bool
    reference: bool
    hill: bool


def constants(params: dict[str, Any]) -> tuple[Consts, Static]:
    """Validated ALPA hyperparameters -> the kernels' constants."""
    a, b, gp, gn, m = (params[k] for k in ("alpha", "beta", "gamma_pos", "gamma_neg", "clip"))
    ref, clipped = params["focusing"] == "reference", m > _CLIP_FLOOR
    m = m if clipped else 0.0
    if ref:
        # d/dx [p^g p_m^(g+1)] = s (p p_m)^g (g p_m + (g+1) p)
        #                      = s (p p_m)^g (2g+1) (p_m + nc)   wherever p_m > 0 (p = p_m + m)
        na, nc = b * (2 * gn + 1), (gn + 1) * m / (2 * gn + 1)
        pe = gp + 1 if clipped else 2 * gp + 1  # without clip q = s: one more power of s
    else:  # d/dx p_m^(g+1) = (g+1) p_m^g p s
        na, nc, pe = b * (gn + 1), 0.0, gp + 1
    hk = b / na
    ge = max(gn, _GAMMA_FLOOR) * (2 if ref and not clipped else 1)
    # Positives: d/dx [c q^gp s^pe] = -c q^gp s^pe p (gp s / q 1{q < 1} + pe).
    consts = Consts(m=m, ge=ge, nc=nc, hk=hk, lam=params["hill_lambda"], pg=gp, pe=pe,
                    plogc=math.log(1.5 * a / b) + math.log(na), npr=-hk * gp, npc=-hk * pe,
                    beta=b, na=na, lna=math.log2(na))
    return consts, Static(clipped=clipped, reference=ref, hill=params["variant"] == "hill")


class Operands(NamedTuple):
    """Constants as 0-d tensors of the compute dtype, for the binary ops: a Python float there is
    wrapped into a tensor and converted on every call, which costs more than the op itself on
    the small tensors of the positive path."""

    m: torch.Tensor
    one: torch.Tensor
    one_m: torch.Tensor  # 1 + m
    ge: torch.Tensor
    lam: torch.Tensor
    pg: torch.Tensor
    plogc: torch.Tensor
    npc: torch.Tensor
    npc_npr: torch.Tensor  # npc + npr
    eps: torch.Tensor  # the negative power's base offset (see the module docstring)
    hk: torch.Tensor
    lna: torch.Tensor


def operands(k: Consts, dtype: torch.dtype, device: torch.device) -> Operands:
    """The 0-d tensors for one setting, device and dtype (built once, cached by the caller)."""
    values = [k.m, 1.0, 1.0 + k.m, k.ge, k.lam, k.pg, k.plogc, k.npc, k.npc + k.npr,
              2.0 ** _EPS_LOG2[dtype], k.hk, k.lna]
    return Operands(*torch.tensor(values, dtype=dtype, device=device).unbind(0))


# -- helpers: fused ops take Python-number constants; under torch.compile constants are tensors --

def _is_num(a: Any) -> bool:
    return isinstance(a, float)


def _addcmul(y: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, a: Any) -> torch.Tensor:
    """y + a * t1 * t2."""
    return torch.addcmul(y, t1, t2, value=a) if _is_num(a) else y + a * t1 * t2


def _addcmul_(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """v - v * p, written into v."""
    return v.addcmul_(v, p, value=-1.0)


def _add_scaled(y: torch.Tensor, a: Any, x: torch.Tensor, out: torch.Tensor | None = None):
    """y + a * x, as a new tensor or (eager) written into ``out``, which may be x."""
    if _is_num(a):
        return torch.add(y, x, alpha=a) if out is None else torch.add(y, x, alpha=a, out=out)
    return y + a * x


def _affine_(y: torch.Tensor, a: Any, c: torch.Tensor) -> torch.Tensor:
    """c + a * y, written into y (c a 0-d tensor): one pass eager."""
    return torch.add(c, y, alpha=a, out=y) if _is_num(a) else y.mul_(a).add_(c)


# -- kernels ------------------------------------------------------------------------------------
# Each returns (loss per element in units of beta / na, d loss / dx per element in absolute units,
# or None). The caller scales the sum by beta / na: one scalar multiply.

def negative(x: torch.Tensor, k: Consts, t: Operands, st: Static, need_grad: bool):
    p = torch.sigmoid(x)
    if st.clipped:
        pm = F.softshrink(p, k.m) if _is_num(k.m) else torch.clamp(p - t.m, min=0)  # p >= 0
        # reference: p^g p_m^(g+1) = p_m (p p_m)^g ;  single: p_m^(g+1) = p_m p_m^g
        base = torch.addcmul(t.eps, p, pm) if st.reference else torch.add(pm, t.eps)
        # Where p_m = 0 the base is eps exactly: its log goes to -inf, so the power is exactly 0
        # there - the kink's indicator, which the derivative needs - at no extra pass.
        power = F.threshold_(base.log2_(), _EPS_LOG2[x.dtype], -math.inf)
        power = _affine_(power, k.ge, t.lna).exp2_()  # na (p p_m)^g: na costs no pass here
        loss = pm.mul_(power)  # p_m is not needed after this
    else:  # p_m = p; the power p^(2g) or p^g is 2^(ge log2 p), so p^2 cannot underflow
        power = _affine_(torch.log2(p), k.ge, t.lna).exp2_()
        loss = torch.mul(power, p)
    if not need_grad:
        if st.hill:
            loss.mul_(torch.sub(t.lam, p))
        return loss, None
    # d loss / dx = (1 - p) power (p_m + nc)   [reference with clip]
    #             = (1 - p) power p            [single with clip; without clip p_m = p]
    # (power carries na). power is not needed after v, so v and the gradient reuse its buffer.
    if st.clipped and st.reference:
        v = _add_scaled(loss, k.nc, power, out=power)
    elif st.clipped:
        v = power.mul_(p)
    else:
        v = loss
    grad = torch.addcmul(v, v, p, value=-1.0) if v is loss else _addcmul_(v, p)
    if st.hill:  # d/dx [l (lam - p)] = dl/dx (lam - p) - l p (1 - p)
        lam_p = torch.sub(t.lam, p)
        lp = torch.mul(loss, p)
        grad = _add_scaled(grad.mul_(lam_p), -k.hk, _addcmul(lp, lp, p, -1.0))
        loss.mul_(lam_p)
    return loss, grad


def positive(x: torch.Tensor, k: Consts, t: Operands, st: Static, need_grad: bool):
    sp = F.softplus(x)  # -log(1 - p), exact for any finite logit
    p = torch.sigmoid(x)
    # q^gamma_pos only exists for reference focusing with a clip; eager, gamma_pos = 0 (the
    # paper's Loss v1 and v2) skips it too.
    with_q = st.reference and st.clipped and not (_is_num(k.pg) and k.pg == 0.0)
    if with_q:
        # q = min(1 - p + m, 1), and q >= m: the lower bound matters where 1 + m rounds to 1.
        # 1 - p loses digits only where it is tiny; q >= m there, and the loss's tail comes from
        # sp, so the rounding of q is harmless.
        q = _add_scaled(t.one_m, -1.0, p).clamp_(min=k.m, max=1.0) if _is_num(k.m) \
            else torch.clamp(t.one_m - p, min=k.m, max=t.one)
        loss = _add_scaled(torch.addcmul(t.plogc, torch.log(q), t.pg), -k.pe, sp).exp_()
    else:
        loss = _add_scaled(t.plogc, -k.pe, sp).exp_()
    if not need_grad:
        return loss, None
    if with_q:
        # q's derivative is -p s while unclamped, 0 once q = 1. There s / q = 1 - m / q, and
        # m / q > m exactly where q < 1, so one threshold gives w = m / q there and 1 elsewhere:
        # gamma_pos s / q 1{q < 1} = gamma_pos (1 - w).
        w = F.threshold_(torch.div(t.m, q), k.m, 1.0) if _is_num(k.m) \
            else torch.where(q < 1, t.m / q, 1.0)
        lp = p.mul_(loss)
        grad = _addcmul(torch.mul(lp, t.npc_npr), lp, w, -k.npr)
    else:
        grad = p.mul_(loss).mul_(t.npc)
    return loss, grad


def index_kernel(x: torch.Tensor, index: torch.Tensor, k: Consts, t: Operands, st: Static,
                 need_grad: bool):
    """Targets as int64 class indices: (sum in units of beta, grad in units of 1 / na or None)."""
    loss, grad = negative(x, k, t, st, need_grad)
    col = index.unsqueeze(1)
    pos_loss, pos_grad = positive(x.gather(1, col), k, t, st, need_grad)
    total = loss.scatter_(1, col, pos_loss).sum()
    if need_grad:
        grad.scatter_(1, col, pos_grad)
    return total, grad


def dense_kernel(x: torch.Tensor, y: torch.Tensor, k: Consts, t: Operands, st: Static,
                 need_grad: bool):
    """Float (N, C) targets: y l+ + (1 - y) l-; lerp returns either end exactly for y in {0, 1}."""
    neg_loss, neg_grad = negative(x, k, t, st, need_grad)
    pos_loss, pos_grad = positive(x, k, t, st, need_grad)
    total = torch.lerp(neg_loss, pos_loss, y).sum()
    return total, (torch.lerp(neg_grad, pos_grad, y) if need_grad else None)


# -- optional torch.compile ----------------------------------------------------------------------

def _entry(kernel, x, target, kt, st, need_grad):
    k = Consts(*kt.unbind(0))
    eps = torch.full((), 2.0 ** _EPS_LOG2[x.dtype], dtype=x.dtype, device=x.device)
    t = Operands(m=k.m, one=torch.ones_like(eps), one_m=1 + k.m, ge=k.ge, lam=k.lam, pg=k.pg,
                 plogc=k.plogc, npc=k.npc, npc_npr=k.npc + k.npr, eps=eps, hk=k.hk, lna=k.lna)
    return kernel(x, target, k, t, st, need_grad)


def _index_entry(x, index, kt, st, need_grad):
    return _entry(index_kernel, x, index, kt, st, need_grad)


def _dense_entry(x, y, kt, st, need_grad):
    return _entry(dense_kernel, x, y, kt, st, need_grad)


_compiled: dict[bool, Any] = {}
_compile_failed = False


def compile_enabled(device: torch.device) -> bool:
    """Whether the fused kernel goes through torch.compile on this device.

    ``ALPA_TUNE_NO_COMPILE=1`` turns compilation off everywhere; ``ALPA_TUNE_COMPILE=1`` turns
    it on for CPU too. By default only CUDA compiles: there one generated kernel replaces a few
    dozen launches, while on CPU the eager fused path already meets its targets and a CPU
    compile costs tens of seconds in every new process.
    """
    if _compile_failed or os.environ.get("ALPA_TUNE_NO_COMPILE", "0") not in ("", "0"):
        return False
    if os.environ.get("ALPA_TUNE_COMPILE", "0") not in ("", "0"):
        return True
    return device.type == "cuda"


def compile_failed() -> bool:
    """Whether a compilation failed in this process (the eager kernel is used from then on)."""
    return _compile_failed


def compiled_tensor(k: Consts, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """All constants as one tensor: the compiled graph's only hyperparameter input."""
    return torch.tensor(list(k), dtype=dtype, device=device)


def run_compiled(is_index: bool, x, target, kt, st, need_grad):
    """The compiled kernel's (total, grad), or None when compilation failed (then eager)."""
    global _compile_failed
    fn = _compiled.get(is_index)
    if fn is None:
        # dynamic=True: batch sizes share a graph (inductor may specialise once on small vs large).
        fn = _compiled[is_index] = torch.compile(_index_entry if is_index else _dense_entry,
                                                 dynamic=True, fullgraph=True)
    try:
        return fn(x, target, kt, st, need_grad)
    except Exception as exc:  # compiler missing or failing: the eager path computes the same
        _compile_failed = True
        warnings.warn(f"alpa-tune: torch.compile of the ALPA kernel failed ({type(exc).__name__}: "
                      f"{exc}); using the eager fused kernel", RuntimeWarning, stacklevel=3)
        return None
