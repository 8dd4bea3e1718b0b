"""The baselines against independent numpy forms of their papers' definitions (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alpa_tune.losses import build_loss, effective_number_weights

COUNTS = [500, 120, 40, 9, 3]
C = len(COUNTS)


def batch(seed, n=12, scale=4.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, scale, size=(n, C))
    y = rng.integers(0, C, size=n)
    return x, y, np.eye(C)[y]


def value_and_grad(loss, x_np, target):
    x = torch.tensor(x_np, requires_grad=True)
    v = loss(x, target)
    v.backward()
    return v.item(), x.grad.numpy()


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


# -- BCE and CE: values and closed-form gradients ----------------------------------------------

def test_bce_value_and_gradient():
    x, y, onehot = batch(0)
    p = sigmoid(x)
    expected = -(onehot * np.log(p) + (1 - onehot) * np.log(1 - p)).sum()
    for target in (torch.tensor(y), torch.tensor(onehot)):
        v, g = value_and_grad(build_loss("bce"), x, target)
        assert v == pytest.approx(expected, rel=1e-12)
        np.testing.assert_allclose(g, p - onehot, rtol=1e-10, atol=1e-14)


def test_ce_value_and_gradient():
    x, y, onehot = batch(1)
    expected = -(onehot * log_softmax(x)).sum()
    soft = np.exp(log_softmax(x))
    for target in (torch.tensor(y), torch.tensor(onehot)):
        v, g = value_and_grad(build_loss("ce"), x, target)
        assert v == pytest.approx(expected, rel=1e-12)
        np.testing.assert_allclose(g, soft - onehot, rtol=1e-10, atol=1e-14)
    v_mean, _ = value_and_grad(build_loss("ce", reduction="mean"), x, torch.tensor(y))
    assert v_mean == pytest.approx(expected / len(y), rel=1e-12)


# -- focal (Lin et al. 2017) ----------------------------------------------------------------------

@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 0.0), (None, 0.5), (0.75, 3.3)])
def test_focal_matches_definition_and_torchvision(alpha, gamma):
    x, y, onehot = batch(2)
    p = sigmoid(x)
    a_pos, a_neg = (1.0, 1.0) if alpha is None else (alpha, 1 - alpha)
    expected = -(onehot * a_pos * (1 - p) ** gamma * np.log(p)
                 + (1 - onehot) * a_neg * p**gamma * np.log(1 - p)).sum()
    loss = build_loss("focal", alpha=alpha, gamma=gamma)
    v, g = value_and_grad(loss, x, torch.tensor(y))
    assert v == pytest.approx(expected, rel=1e-10)
    from torchvision.ops import sigmoid_focal_loss

    xt = torch.tensor(x, requires_grad=True)
    tv = sigmoid_focal_loss(xt, torch.tensor(onehot), alpha=-1 if alpha is None else alpha,
                            gamma=gamma, reduction="sum")
    tv.backward()
    assert v == pytest.approx(tv.item(), rel=1e-10)
    np.testing.assert_allclose(g, xt.grad.numpy(), rtol=1e-8, atol=1e-12)


# -- ASL (Ridnik et al. 2021) ---------------------------------------------------------------------

def official_asl(x, y, gamma_neg, gamma_pos, clip, eps):
    """The official AsymmetricLoss forward (sum), transcribed in torch; naive, not finite everywhere."""
    x_sigmoid = torch.sigmoid(x)
    xs_pos = x_sigmoid
    xs_neg = 1 - x_sigmoid
    if clip is not None and clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    los_pos = y * torch.log(xs_pos.clamp(min=eps))
    los_neg = (1 - y) * torch.log(xs_neg.clamp(min=eps))
    loss = los_pos + los_neg
    if gamma_neg > 0 or gamma_pos > 0:
        pt = xs_pos * y + xs_neg * (1 - y)
        one_sided_gamma = gamma_pos * y + gamma_neg * (1 - y)
        loss = loss * torch.pow(1 - pt, one_sided_gamma)
    return -loss.sum()


@pytest.mark.parametrize("gamma_pos,gamma_neg,clip", [(1.0, 4.0, 0.05), (0.0, 4.0, 0.05),
                                                      (0.0, 0.0, 0.0), (2.5, 1.5, 0.2),
                                                      (0.5, 3.0, 0.0)])
def test_asl_matches_definition_and_official_code(gamma_pos, gamma_neg, clip):
    x, y, onehot = batch(3, scale=3.0)
    x = np.where(np.abs(sigmoid(x) - clip) < 1e-3, x + 0.01, x)  # off the clip kink
    eps = 1e-8
    p = sigmoid(x)
    q = np.minimum(1 - p + clip, 1) if clip > 0 else 1 - p
    expected = -(onehot * np.log(np.maximum(p, eps)) * (1 - p) ** gamma_pos
                 + (1 - onehot) * np.log(np.maximum(q, eps)) * (1 - q) ** gamma_neg).sum()
    loss = build_loss("asl", gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip)
    v, g = value_and_grad(loss, x, torch.tensor(y))
    assert v == pytest.approx(expected, rel=1e-10)
    xt = torch.tensor(x, requires_grad=True)
    official = official_asl(xt, torch.tensor(onehot), gamma_neg, gamma_pos, clip, eps)
    official.backward()
    assert v == pytest.approx(official.item(), rel=1e-10)
    np.testing.assert_allclose(g, xt.grad.numpy(), rtol=1e-8, atol=1e-12)


def test_asl_eps_clamps_the_log_like_the_official_code():
    x = torch.tensor([[-40.0, 0.0]], dtype=torch.float64)  # p = 4e-18 < eps for the positive
    loss = build_loss("asl", gamma_pos=0.0, gamma_neg=0.0, clip=0.0, eps=1e-8)
    expected = official_asl(x, torch.tensor([[1.0, 0.0]], dtype=torch.float64), 0.0, 0.0, 0.0, 1e-8)
    assert loss(x, torch.tensor([0])).item() == pytest.approx(expected.item(), rel=1e-12)


def test_asl_detach_weight_drops_the_weight_gradient():
    x, y, onehot = batch(4)
    loss = build_loss("asl", gamma_pos=1.0, gamma_neg=4.0, clip=0.0, detach_weight=True)
    _, g = value_and_grad(loss, x, torch.tensor(y))
    p = sigmoid(x)
    # d/dx of -w log p with w held fixed: -w (1 - p) for positives, w p for negatives.
    expected = np.where(onehot == 1, -((1 - p) ** 1.0) * (1 - p), p**4.0 * p)
    np.testing.assert_allclose(g, expected, rtol=1e-9, atol=1e-14)


# -- class-balanced (Cui et al. 2019) -------------------------------------------------------------

def cb_weights(counts, beta):
    w = (1 - beta) / (1 - np.power(beta, np.asarray(counts, dtype=np.float64)))
    return w / w.sum() * len(counts)


def test_effective_number_weights():
    for beta in (0.0, 0.9, 0.999, 0.9999):
        np.testing.assert_allclose(effective_number_weights(tuple(COUNTS), beta),
                                   cb_weights(COUNTS, beta), rtol=1e-9)


@pytest.mark.parametrize("base,gamma,beta", [("ce", 0.0, 0.9999), ("focal", 2.0, 0.999),
                                             ("focal", 0.5, 0.9), ("bce", 0.0, 0.99)])
def test_class_balanced_matches_definition(base, gamma, beta):
    x, y, onehot = batch(5)
    w = cb_weights(COUNTS, beta)[y]
    if base == "ce":
        per_sample = -(onehot * log_softmax(x)).sum(axis=1)
    else:
        p = sigmoid(x)
        g = gamma if base == "focal" else 0.0
        # Cui's modulator exp(-g y x - g log(1 + exp(-x))) is (1 - p_t)^g.
        mod = np.exp(-g * onehot * x - g * np.log1p(np.exp(-x)))
        bce = -(onehot * np.log(p) + (1 - onehot) * np.log(1 - p))
        per_sample = (mod * bce).sum(axis=1)
    expected = (w * per_sample).sum()
    loss = build_loss("cb", class_counts=COUNTS, beta=beta, base=base, gamma=gamma)
    for target in (torch.tensor(y), torch.tensor(onehot)):
        v, _ = value_and_grad(loss, x, target)
        assert v == pytest.approx(expected, rel=1e-10)


# -- LDAM (Cao et al. 2019) -----------------------------------------------------------------------

def ldam_reference(x, y, counts, max_m=0.5, s=30.0, weights=None):
    m = 1.0 / np.sqrt(np.sqrt(np.asarray(counts, dtype=np.float64)))
    m = m * (max_m / m.max())
    onehot = np.eye(len(counts))[y]
    out = np.where(onehot == 1, x - m[y][:, None], x)
    ce = -(onehot * log_softmax(s * out)).sum(axis=1)
    return (ce if weights is None else ce * weights[y]).sum(), m


def test_ldam_margins_and_value():
    x, y, onehot = batch(6, scale=0.5)  # cosine-like logits
    expected, margins = ldam_reference(x, y, COUNTS)
    assert max(margins) == pytest.approx(0.5)
    loss = build_loss("ldam", class_counts=COUNTS)
    np.testing.assert_allclose(loss.margins, margins, rtol=1e-12)
    for target in (torch.tensor(y), torch.tensor(onehot)):
        v, _ = value_and_grad(loss, x, target)
        assert v == pytest.approx(expected, rel=1e-10)
    other, _ = ldam_reference(x, y, COUNTS, max_m=0.3, s=10.0)
    v, _ = value_and_grad(build_loss("ldam", class_counts=COUNTS, max_m=0.3, s=10.0), x, torch.tensor(y))
    assert v == pytest.approx(other, rel=1e-10)


def test_ldam_deferred_reweighting():
    x, y, _ = batch(7, scale=0.5)
    w = cb_weights(COUNTS, 0.9999)
    plain, _ = ldam_reference(x, y, COUNTS)
    weighted, _ = ldam_reference(x, y, COUNTS, weights=w)
    loss = build_loss("ldam", class_counts=COUNTS, drw=True, drw_start=0.3)
    np.testing.assert_allclose(loss.drw_weights, w, rtol=1e-9)
    assert not loss.reweighting  # not told the epoch yet
    loss.set_epoch(2, 10)
    assert not loss.reweighting
    assert value_and_grad(loss, x, torch.tensor(y))[0] == pytest.approx(plain, rel=1e-10)
    loss.set_epoch(3, 10)  # ceil(0.3 * 10) = 3
    assert loss.reweighting
    assert value_and_grad(loss, x, torch.tensor(y))[0] == pytest.approx(weighted, rel=1e-10)
    always = build_loss("ldam", class_counts=COUNTS, reweight=True)
    assert value_and_grad(always, x, torch.tensor(y))[0] == pytest.approx(weighted, rel=1e-10)


# -- gradients by finite differences --------------------------------------------------------------

@pytest.mark.parametrize("name,kwargs", [
    ("bce", {}), ("ce", {}), ("focal", {"gamma": 1.5}), ("focal", {"gamma": 0.4, "alpha": None}),
    ("asl", {}), ("asl", {"gamma_pos": 0.3, "gamma_neg": 0.6, "clip": 0.0}),
    ("cb", {"class_counts": COUNTS, "base": "focal", "gamma": 0.7}),
    ("cb", {"class_counts": COUNTS}),
    ("ldam", {"class_counts": COUNTS, "reweight": True, "s": 5.0}),
])
def test_baseline_gradcheck(name, kwargs):
    x_np, y, onehot = batch(8, n=5, scale=2.0)
    x_np = np.where(np.abs(sigmoid(x_np) - 0.05) < 1e-3, x_np + 0.01, x_np)
    loss = build_loss(name, **kwargs)
    x = torch.tensor(x_np, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: loss(t, torch.tensor(y)), (x,))
    assert torch.autograd.gradcheck(lambda t: loss(t, torch.tensor(onehot)), (x,))


@pytest.mark.parametrize("name", ["asl", "focal", "bce", "ce", "cb", "ldam"])
def test_baseline_mean_is_sum_over_batch_size(name):
    x, y, _ = batch(9)
    kwargs = {"class_counts": COUNTS} if name in ("cb", "ldam") else {}
    total = build_loss(name, **kwargs)(torch.tensor(x), torch.tensor(y))
    mean = build_loss(name, reduction="mean", **kwargs)(torch.tensor(x), torch.tensor(y))
    assert mean.item() == pytest.approx(total.item() / len(y), rel=1e-12)


def test_half_precision_baselines_return_float32():
    x = torch.randn(8, C).half().requires_grad_()
    y = torch.randint(0, C, (8,))
    for name in ("asl", "focal", "bce", "ce", "cb", "ldam"):
        kwargs = {"class_counts": COUNTS} if name in ("cb", "ldam") else {}
        v = build_loss(name, **kwargs)(x, y)
        assert v.dtype == torch.float32
        v.backward()
        assert x.grad.dtype == torch.float16
        x.grad = None
