"""The loss registry and ALPA's exactness: values and gradients against independent closed forms.

The expected values are written directly from design.md section 3 in numpy (naive powers,
product-rule derivatives), not from the fused kernel's log-space rearrangement.
"""

from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alpa_tune.losses import (
    ALPALoss,
    LossConfigError,
    alpa_unfused,
    available_losses,
    build_loss,
    compile_enabled,
    loss_parameters,
)

COUNTS = [40, 20, 10, 5, 2]


# -- independent reference ------------------------------------------------------------------------

def ref_alpa(x, y, alpha, beta, gamma_pos, gamma_neg, clip=0.05, focusing="reference",
             variant="plain", hill_lambda=1.5):
    """Elementwise loss and d loss / d x of design.md section 3, by the product rule."""
    gp, gn, m = gamma_pos, gamma_neg, clip
    with np.errstate(divide="ignore", invalid="ignore"):
        p = 1.0 / (1.0 + np.exp(-x))
        s = 1.0 / (1.0 + np.exp(x))
        dp, ds = p * s, -p * s
        if m > 0:
            q = np.minimum(s + m, 1.0)
            dq = np.where(s + m < 1.0, ds, 0.0)
        else:
            q, dq = s, ds
        pm = np.maximum(p - m, 0.0)
        dpm = np.where(p > m, dp, 0.0)
        if focusing == "reference":
            lpos = 1.5 * alpha * q**gp * s ** (gp + 1)
            dlpos = 1.5 * alpha * (gp * q ** (gp - 1) * dq * s ** (gp + 1)
                                   + q**gp * (gp + 1) * s**gp * ds)
            lneg = beta * p**gn * pm ** (gn + 1)
            dlneg = beta * (gn * p ** (gn - 1) * dp * pm ** (gn + 1) + p**gn * (gn + 1) * pm**gn * dpm)
        else:
            lpos = 1.5 * alpha * s ** (gp + 1)
            dlpos = 1.5 * alpha * (gp + 1) * s**gp * ds
            lneg = beta * pm ** (gn + 1)
            dlneg = beta * (gn + 1) * pm**gn * dpm
        if variant == "hill":
            lneg, dlneg = lneg * (hill_lambda - p), dlneg * (hill_lambda - p) - lneg * dp
    return y * lpos + (1 - y) * lneg, y * dlpos + (1 - y) * dlneg


def logits_away_from_kinks(n, c, clip, seed, low=-8.0, high=8.0):
    """Uniform logits, nudged off sigmoid(x) = clip where the loss has a kink."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(low, high, size=(n, c))
    if clip > 0:
        kink = math.log(clip / (1 - clip))
        near = np.abs(x - kink) < 1e-3
        x[near] += 0.01
    return x


def run(loss, x_np, target):
    x = torch.tensor(x_np, dtype=torch.float64, requires_grad=True)
    value = loss(x, target)
    value.backward()
    return value.item(), x.grad.numpy()


# -- registry --------------------------------------------------------------------------------------

def test_available_losses_lists_every_name():
    assert available_losses() == sorted(["alpa", "alpa_hill", "asl", "bce", "cb", "ce", "focal", "ldam"])


@pytest.mark.parametrize("name", ["alpa", "alpa_hill", "asl", "bce", "cb", "ce", "focal", "ldam"])
def test_build_every_loss_and_rebuild_from_params(name):
    kwargs = {"class_counts": COUNTS} if name in ("cb", "ldam") else {}
    loss = build_loss(name, **kwargs)
    assert isinstance(loss, torch.nn.Module)
    params = json.loads(json.dumps(loss.params))  # export goes through JSON
    rebuilt = build_loss(loss.name, **params)
    assert rebuilt.params == loss.params
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    assert torch.equal(loss(x, y), rebuilt(x, y))


def test_register_loss_refuses_a_taken_name():
    from alpa_tune.losses import CELoss, register_loss

    with pytest.raises(ValueError, match="already registered"):
        register_loss(CELoss)


def test_alpa_hill_alias_sets_the_variant():
    loss = build_loss("alpa_hill", alpha=1.25, beta=2, gamma_pos=3, gamma_neg=2)
    assert loss.params["variant"] == "hill" and loss.name == "alpa"
    assert build_loss("alpa_hill", variant="hill").params["variant"] == "hill"
    with pytest.raises(LossConfigError, match="variant"):
        build_loss("alpa_hill", variant="plain")
    assert "variant" not in loss_parameters("alpa_hill")


def test_unknown_name_lists_valid_names():
    with pytest.raises(LossConfigError) as info:
        build_loss("alpah")
    message = str(info.value)
    assert "'alpah'" in message and all(n in message for n in available_losses())
    assert isinstance(info.value, ValueError)


def test_unknown_parameter_lists_valid_parameters():
    with pytest.raises(LossConfigError) as info:
        build_loss("alpa", gama_pos=1.0)
    message = str(info.value)
    assert "'gama_pos'" in message
    for p in ("alpha", "beta", "gamma_pos", "gamma_neg", "clip", "focusing", "variant", "hill_lambda"):
        assert p in message
    with pytest.raises(LossConfigError, match="valid parameters: reduction"):
        build_loss("ce", gamma=2)


@pytest.mark.parametrize("name,kwargs,fragment", [
    ("alpa", {"alpha": -1.0}, "alpha"),
    ("alpa", {"beta": 0.0}, "beta"),
    ("alpa", {"gamma_neg": float("nan")}, "gamma_neg"),
    ("alpa", {"gamma_pos": -0.5}, "gamma_pos"),
    ("alpa", {"clip": 1.0}, "clip"),
    ("alpa", {"alpha": "1"}, "alpha"),
    ("alpa", {"alpha": True}, "alpha"),
    ("alpa", {"focusing": "double"}, "focusing"),
    ("alpa", {"variant": "v3"}, "variant"),
    ("alpa", {"hill_lambda": 0.5}, "hill_lambda"),
    ("alpa", {"reduction": "none"}, "reduction"),
    ("focal", {"alpha": 1.5}, "alpha"),
    ("asl", {"eps": 0.0}, "eps"),
    ("cb", {}, "class_counts"),
    ("cb", {"class_counts": [3, 0, 1]}, "class_counts"),
    ("cb", {"class_counts": COUNTS, "beta": 1.0}, "beta"),
    ("cb", {"class_counts": COUNTS, "base": "softmax"}, "base"),
    ("ldam", {"class_counts": [5]}, "class_counts"),
    ("ldam", {"class_counts": COUNTS, "drw_start": 1.5}, "drw_start"),
    ("ldam", {"class_counts": COUNTS, "drw": True, "reweight": True}, "exclude each other"),
    ("ldam", {"class_counts": COUNTS, "s": 0}, "s"),
])
def test_bad_values_are_refused_with_the_key(name, kwargs, fragment):
    with pytest.raises(LossConfigError, match=fragment):
        build_loss(name, **kwargs)


def test_set_params_changes_values_cheaply_and_validates():
    loss = build_loss("alpa", alpha=1, beta=1, gamma_pos=0, gamma_neg=4)
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (8,))
    new = dict(alpha=1.25, beta=2.0, gamma_pos=3.0, gamma_neg=2.0, variant="hill")
    assert loss.set_params(**new) is loss
    assert loss.params == build_loss("alpa", **new).params
    assert torch.equal(loss(x, y), build_loss("alpa", **new)(x, y))
    before = loss.params
    with pytest.raises(LossConfigError, match="gamma"):
        loss.set_params(gamma=1.0)
    with pytest.raises(LossConfigError, match="alpha"):
        loss.set_params(alpha=-2.0)
    assert loss.params == before  # a refused change leaves the loss as it was


def test_class_counts_accept_tensors_and_arrays():
    a = build_loss("ldam", class_counts=torch.tensor(COUNTS))
    b = build_loss("ldam", class_counts=np.array(COUNTS))
    assert a.params["class_counts"] == b.params["class_counts"] == COUNTS


def test_bad_inputs_raise_value_errors():
    loss = build_loss("alpa")
    with pytest.raises(ValueError, match="logits"):
        loss(torch.randn(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        loss(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="match"):
        loss(torch.randn(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="class_counts"):
        build_loss("cb", class_counts=COUNTS)(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


# -- ALPA: exact values and gradients --------------------------------------------------------------

def test_alpa_hand_computed_values():
    # x = 0: p = s = 1/2. alpha = beta = 1, gamma_pos = 0, gamma_neg = 4, clip = 0.05:
    # positive 1.5 * 0.5 = 0.75; negative 0.5^4 * 0.45^5 = 0.00115330078125.
    loss = build_loss("alpa", alpha=1, beta=1, gamma_pos=0, gamma_neg=4, clip=0.05)
    x = torch.zeros(1, 2, dtype=torch.float64)
    assert loss(x, torch.tensor([0])).item() == pytest.approx(0.75 + 0.5**4 * 0.45**5, rel=1e-14)
    # Hill: the negative term times (1.5 - 0.5) = 1; single focusing: 1.5 * 0.5 and 0.45^5.
    single = build_loss("alpa", alpha=1, beta=1, gamma_pos=0, gamma_neg=4, focusing="single")
    assert single(x, torch.tensor([0])).item() == pytest.approx(0.75 + 0.45**5, rel=1e-14)
    # gamma_pos = 1, clip = 0: positive 1.5 * s^3 = 0.1875 (the weight counts twice).
    ref = build_loss("alpa", alpha=1, beta=1, gamma_pos=1, gamma_neg=0, clip=0)
    assert ref(torch.zeros(1, 1, dtype=torch.float64), torch.tensor([0])).item() == pytest.approx(0.1875)


SETTINGS = [  # (alpha, beta, gamma_pos, gamma_neg)
    (1.0, 1.0, 0.0, 4.0),  # paper Loss v1
    (0.875, 1.625, 0.0, 4.0),  # Loss v2
    (1.25, 2.0, 3.0, 2.0),  # Loss v3 (with Hill)
    (0.5, 0.7, 0.0, 0.0),
    (1.7, 0.6, 0.37, 0.21),  # fractional below 1
    (2.0, 2.0, 5.0, 5.0),
]


@pytest.mark.parametrize("focusing,variant,clip", list(itertools.product(
    ["reference", "single"], ["plain", "hill"], [0.0, 0.05, 0.2])))
def test_alpa_matches_closed_form_float64(focusing, variant, clip):
    x = logits_away_from_kinks(24, 7, clip, seed=1)
    index = np.random.default_rng(2).integers(0, 7, size=24)
    onehot = np.eye(7)[index]
    multihot = (np.random.default_rng(3).random((24, 7)) < 0.3).astype(np.float64)
    soft = 0.8 * multihot + 0.1  # label smoothing: y l+ + (1 - y) l-
    for a, b, gp, gn in SETTINGS:
        kw = dict(alpha=a, beta=b, gamma_pos=gp, gamma_neg=gn, clip=clip, focusing=focusing,
                  variant=variant, hill_lambda=1.5 if variant == "plain" else 1.3)
        loss = build_loss("alpa", **kw)
        for target_np, target in [(onehot, torch.tensor(index)), (onehot, torch.tensor(onehot)),
                                  (multihot, torch.tensor(multihot)), (soft, torch.tensor(soft))]:
            el, grad = ref_alpa(x, target_np, **kw)
            value, got = run(loss, x, target)
            assert value == pytest.approx(el.sum(), rel=1e-12, abs=1e-12), kw
            np.testing.assert_allclose(got, grad, rtol=1e-9, atol=1e-13, err_msg=str(kw))


def test_alpa_mean_is_sum_over_batch_size():
    x = logits_away_from_kinks(10, 4, 0.05, seed=4)
    y = torch.tensor(np.random.default_rng(5).integers(0, 4, 10))
    kw = dict(alpha=1.2, beta=0.8, gamma_pos=1.5, gamma_neg=2.5)
    v_sum, g_sum = run(build_loss("alpa", **kw), x, y)
    v_mean, g_mean = run(build_loss("alpa", reduction="mean", **kw), x, y)
    assert v_mean == pytest.approx(v_sum / 10, rel=1e-14)
    np.testing.assert_allclose(g_mean, g_sum / 10, rtol=1e-14)


def test_alpa_extreme_logits_float64_match_high_precision():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    xs = [-700.0, -80.0, -30.0, -5.0, 5.0, 30.0, 80.0, 700.0]
    for clip, (gp, gn) in itertools.product([0.0, 0.05], [(0.0, 0.0), (0.3, 4.0), (2.5, 0.7)]):
        loss = build_loss("alpa", alpha=1.1, beta=0.9, gamma_pos=gp, gamma_neg=gn, clip=clip)
        for label in (0, 1):
            x = torch.tensor([[v] for v in xs], dtype=torch.float64, requires_grad=True)
            y = torch.full((len(xs),), label) if label else torch.zeros(len(xs), 1, dtype=torch.float64)
            if label:
                y = torch.zeros(len(xs), dtype=torch.long)  # class 0 of 1: every element positive
            value = loss(x, y)
            value.backward()
            expected = mpmath.mpf(0)
            for v in xs:
                p = 1 / (1 + mpmath.exp(-v))
                s = 1 / (1 + mpmath.exp(v))
                if label:
                    q = min(s + clip, mpmath.mpf(1)) if clip else s
                    expected += mpmath.mpf(1.5) * 1.1 * q**gp * s ** (gp + 1)
                else:
                    pm = max(p - clip, mpmath.mpf(0))
                    expected += mpmath.mpf(0.9) * p**gn * pm ** (gn + 1)
            assert value.item() == pytest.approx(float(expected), rel=1e-12, abs=1e-300)
            assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("focusing,variant,clip,gammas", [
    ("reference", "plain", 0.05, (0.0, 4.0)),
    ("reference", "hill", 0.05, (3.0, 2.0)),
    ("reference", "plain", 0.0, (0.4, 0.6)),
    ("single", "plain", 0.1, (1.5, 0.0)),
    ("single", "hill", 0.0, (0.0, 2.5)),
])
def test_alpa_gradcheck(focusing, variant, clip, gammas):
    loss = build_loss("alpa", alpha=1.3, beta=0.7, gamma_pos=gammas[0], gamma_neg=gammas[1],
                      clip=clip, focusing=focusing, variant=variant)
    x = torch.tensor(logits_away_from_kinks(5, 4, clip, seed=7, low=-4, high=4), requires_grad=True)
    index = torch.tensor([0, 3, 1, 1, 2])
    multihot = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 0, 1.0]],
                            dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: loss(t, index), (x,))
    assert torch.autograd.gradcheck(lambda t: loss(t, multihot), (x,))


def test_alpa_agrees_with_the_authors_unfused_sequence():
    x = torch.tensor(logits_away_from_kinks(32, 6, 0.05, seed=8), requires_grad=True)
    index = torch.randint(0, 6, (32,), generator=torch.Generator().manual_seed(9))
    onehot = F.one_hot(index, 6).double()
    for focusing, variant in itertools.product(["reference", "single"], ["plain", "hill"]):
        kw = dict(alpha=1.25, beta=2.0, gamma_pos=3.0, gamma_neg=2.0, clip=0.05, focusing=focusing,
                  variant=variant, hill_lambda=1.5)
        fused = build_loss("alpa", **kw)(x, index)
        (g_fused,) = torch.autograd.grad(fused, x)
        unfused = alpa_unfused(x, onehot, **kw)
        (g_unfused,) = torch.autograd.grad(unfused, x)
        torch.testing.assert_close(fused, unfused, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_fused, g_unfused, rtol=1e-9, atol=1e-12)


def test_alpa_backward_scales_with_upstream_gradient_and_can_repeat():
    loss = build_loss("alpa", gamma_pos=1.0)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    value = loss(x, y)
    (g1,) = torch.autograd.grad(value, x, retain_graph=True)
    (g3,) = torch.autograd.grad(3.0 * value, x, retain_graph=True)
    (g1_again,) = torch.autograd.grad(value, x)
    torch.testing.assert_close(g3, 3 * g1)
    torch.testing.assert_close(g1_again, g1)


def test_alpa_without_grad_gives_the_same_value():
    loss = build_loss("alpa_hill", alpha=1.25, beta=2, gamma_pos=3, gamma_neg=2)
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (16,))
    with torch.no_grad():
        plain = loss(x, y)
    tracked = loss(x.clone().requires_grad_(), y)
    assert plain.item() == pytest.approx(tracked.item(), rel=1e-15)
    assert plain.requires_grad is False


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_alpa_low_precision_dtypes_return_float32_loss_and_input_dtype_grads(dtype):
    x64 = torch.randn(32, 7, dtype=torch.float64) * 3
    x = x64.to(dtype).requires_grad_()
    y = torch.randint(0, 7, (32,))
    loss = build_loss("alpa", alpha=1.1, beta=1.4, gamma_pos=1.0, gamma_neg=3.0)
    value = loss(x, y)
    value.backward()
    assert value.dtype == torch.float32 and x.grad.dtype == dtype
    # Same maths as float64 on the rounded inputs, up to float32 arithmetic.
    reference = loss(x.detach().double(), y)
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)


def test_alpa_module_moves_and_has_no_state_tensors():
    loss = build_loss("alpa")
    assert list(loss.parameters()) == [] and list(loss.buffers()) == []
    assert loss.to("cpu") is loss


def test_compile_switches(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("ALPA_TUNE_NO_COMPILE", raising=False)
    monkeypatch.delenv("ALPA_TUNE_COMPILE", raising=False)
    assert compile_enabled(cpu) is False and compile_enabled(cuda) is True
    monkeypatch.setenv("ALPA_TUNE_COMPILE", "1")
    assert compile_enabled(cpu) is True
    monkeypatch.setenv("ALPA_TUNE_NO_COMPILE", "1")
    assert compile_enabled(cpu) is False and compile_enabled(cuda) is False


def test_alpa_loss_class_is_the_registered_one():
    assert isinstance(build_loss("alpa"), ALPALoss)


@pytest.mark.skipif(os.environ.get("ALPA_TUNE_TEST_COMPILE") != "1",
                    reason="compiles with torch.compile (10-60 s on CPU); ALPA_TUNE_TEST_COMPILE=1 runs it")
def test_compiled_kernel_matches_eager_and_never_recompiles_on_new_values(monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("ALPA_TUNE_COMPILE", "1")
    torch.manual_seed(0)
    x = (3 * torch.randn(64, 7)).requires_grad_()
    index = torch.randint(0, 7, (64,))
    onehot = F.one_hot(index, 7).float()
    for variant in ("plain", "hill"):
        kw = dict(alpha=1.2, beta=0.8, gamma_pos=1.3, gamma_neg=0.4, variant=variant)
        compiled, eager = build_loss("alpa", **kw), build_loss("alpa", **kw)
        eager._use_compile["cpu"] = False
        for target in (index, onehot):
            (g_c,) = torch.autograd.grad(v_c := compiled(x, target), x)
            (g_e,) = torch.autograd.grad(v_e := eager(x, target), x)
            torch.testing.assert_close(v_c, v_e, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-6)
    graphs = counters["stats"]["unique_graphs"]
    for gamma_neg in (0.0, 2.5, 5.0):  # new trials: new values, same graph
        compiled.set_params(gamma_neg=gamma_neg, alpha=0.6)
        eager.set_params(gamma_neg=gamma_neg, alpha=0.6)
        torch.testing.assert_close(compiled(x, index), eager(x, index), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("name", ["alpa", "ldam"])
def test_losses_pickle_and_deepcopy_after_use(name):
    import copy
    import pickle

    loss = build_loss(name, **({"class_counts": COUNTS} if name == "ldam" else {}))
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    value = loss(x, y)  # fills the per-device caches
    for clone in (pickle.loads(pickle.dumps(loss)), copy.deepcopy(loss)):
        assert clone.params == loss.params
        assert torch.equal(clone(x, y), value)
