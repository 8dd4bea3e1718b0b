"""Every loss is tunable: each declared space samples, decodes and builds a finite loss at every corner.

Also: ALPA's declared space reproduces the trial parameters `search.suggest` has always produced,
so existing studies keep working, and `narrow` refuses bad overrides by name.
"""

from __future__ import annotations

import optuna
import pytest
import torch

from alpa_tune.losses import (
    available_losses,
    build_loss,
    loss_kwargs,
    loss_paper_points,
    loss_paper_setting,
    loss_search_space,
)
from alpa_tune.space import Choice, Real, corners, decode_trial_params, narrow, sample, trial_param_names

COUNTS = [400, 90, 20, 5]
C = len(COUNTS)
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


class StrictTrial:
    """A fake trial answering from ``params``; it fails a value outside the requested distribution."""

    def __init__(self, params):
        self.params, self.asked = dict(params), []

    def suggest_float(self, name, low, high, *, log=False):
        value = self.params[name]
        assert low <= value <= high, (name, value, low, high)
        self.asked.append((name, "float", low, high, log))
        return value

    def suggest_categorical(self, name, choices):
        value = self.params[name]
        assert value in choices, (name, value, choices)
        self.asked.append((name, "categorical", tuple(choices)))
        return value


def build(name, kwargs):
    cls_needs_counts = name in ("cb", "ldam")
    return build_loss(name, **kwargs, **({"class_counts": COUNTS} if cls_needs_counts else {}))


def batch(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, C, generator=g, dtype=torch.float64) * 6
    x[0, 0], x[1, 1] = 60.0, -60.0  # saturated logits as well
    y = torch.randint(0, C, (16,), generator=g)
    return x.to(dtype), y, torch.nn.functional.one_hot(y, C).to(dtype)


@pytest.mark.parametrize("name", available_losses())
def test_every_corner_builds_a_finite_loss(name):
    space = loss_search_space(name)
    points = corners(space)
    assert points and len(points) == len({tuple(sorted(p.items(), key=str)) for p in points})
    for params in points:
        kwargs = sample(StrictTrial(params), space)
        assert decode_trial_params(space, params) == kwargs
        assert loss_kwargs(name, params) == kwargs
        loss = build(name, kwargs)
        assert build_loss(loss.name, **loss.params).params == loss.params
        for dtype in DTYPES:
            x, y, onehot = batch(len(params), dtype)
            for target in (y, onehot):
                value = loss(x, target)
                assert torch.isfinite(value), (name, params, dtype, target.dtype)
        x = batch(0, torch.float32)[0].requires_grad_()
        loss(x, batch(0, torch.float32)[1]).backward()
        assert torch.isfinite(x.grad).all(), (name, params)


def test_corner_counts_follow_optional_and_conditional_parameters():
    assert len(corners(loss_search_space("alpa"))) == 2 ** 4 * 2
    focal = corners(loss_search_space("focal"))
    assert len(focal) == 2 * 3 and {"gamma": 0.0, "use_alpha": False} in focal
    cb = corners(loss_search_space("cb"))  # gamma only with base focal
    assert len(cb) == 2 * (1 + 1 + 2)
    assert all(("gamma" in p) == (p["base"] == "focal") for p in cb)
    assert corners(loss_search_space("ce")) == [{}] == corners(loss_search_space("bce"))


def test_optional_and_complement_decode():
    focal = loss_search_space("focal")
    assert decode_trial_params(focal, {"gamma": 1.0, "use_alpha": False}) == {"gamma": 1.0, "alpha": None}
    assert build("focal", decode_trial_params(focal, {"gamma": 1.0, "use_alpha": False})).params["alpha"] is None
    cb = loss_search_space("cb")
    assert trial_param_names(cb) == ["one_minus_beta", "base", "gamma"]
    kw = decode_trial_params(cb, {"one_minus_beta": 1e-4, "base": "ce"})
    assert kw == {"beta": 0.9999, "base": "ce"}
    assert build("cb", kw).params["beta"] == 0.9999


def test_decode_refuses_missing_and_foreign_params():
    space = loss_search_space("asl")
    with pytest.raises(ValueError, match="lack 'clip'"):
        decode_trial_params(space, {"gamma_pos": 0.0, "gamma_neg": 4.0})
    with pytest.raises(ValueError, match="'eps'.*not in the search space"):
        decode_trial_params(space, {"gamma_pos": 0.0, "gamma_neg": 4.0, "clip": 0.0, "eps": 1.0})
    with pytest.raises(ValueError, match=r"variant='focal' is not one of \['alpa', 'alpa_hill'\]"):
        loss_kwargs("alpa", {"alpha": 1.0, "beta": 1.0, "gamma_pos": 0.0, "gamma_neg": 4.0, "variant": "focal"})


@pytest.mark.parametrize("name", available_losses())
def test_paper_points_lie_in_the_space_and_build(name):
    space = loss_search_space(name)
    setting = loss_paper_setting(name)
    build(name, setting)
    decoded = []
    for point in loss_paper_points(name):
        trial = StrictTrial(point)  # asserts each value lies in its distribution
        kwargs = sample(trial, space)
        assert sorted(point) == sorted(n for n, *_ in trial.asked)
        build(name, kwargs)
        decoded.append(kwargs)
    if decoded:  # the untuned default is one of the enqueued points
        assert any(all(setting.get(k) == v for k, v in d.items() if k != "variant") for d in decoded)
    else:
        assert space == {} and setting == {}


def test_paper_settings():
    assert loss_paper_setting("focal") == {"gamma": 2.0, "alpha": 0.25}
    assert loss_paper_setting("asl") == {"gamma_pos": 0.0, "gamma_neg": 4.0, "clip": 0.05}
    assert loss_paper_setting("cb") == {"beta": 0.9999, "base": "ce"}
    assert loss_paper_setting("ldam") == {"max_m": 0.5, "s": 30.0}
    assert loss_paper_setting("alpa")["alpha"] == 0.875
    hill = loss_paper_setting("alpa_hill")  # Loss v3, not v2 with Hill bolted on
    assert hill["variant"] == "hill" and hill["alpha"] == 1.25
    assert "variant" not in loss_search_space("alpa_hill")
    assert loss_paper_points("alpa_hill") == [{"alpha": 1.25, "beta": 2.0, "gamma_pos": 3.0, "gamma_neg": 2.0}]


# -- ALPA: today's trial parameters, exactly ---------------------------------------------------

search = pytest.importorskip("alpa_tune.search")
config = pytest.importorskip("alpa_tune.config")


def test_alpa_paper_points_are_the_search_modules():
    assert loss_paper_points("alpa") == [dict(p) for p in search.PAPER_POINTS]


@pytest.mark.parametrize("variants", [("alpa", "alpa_hill"), ("alpa",), ("alpa_hill", "alpa")])
def test_alpa_space_reproduces_search_suggest(variants):
    cfg = config.SearchConfig(variants=variants)
    space, fixed = narrow(loss_search_space("alpa"), {"variant": list(variants)})
    assert fixed == {}
    for point in search.paper_points(cfg) or [{"alpha": 1.0, "beta": 1.0, "gamma_pos": 0.0,
                                              "gamma_neg": 4.0, "variant": variants[0]}]:
        ours, theirs = optuna.trial.FixedTrial(point), optuna.trial.FixedTrial(point)
        kwargs = sample(ours, space)
        assert search.suggest(theirs, cfg) == point
        assert ours.params == theirs.params and ours.distributions == theirs.distributions
        name, spec = search.loss_spec(point, cfg.space)
        rest = {k: v for k, v in spec.items() if k not in kwargs}  # clip, focusing, hill_lambda: config
        assert build_loss(name, **kwargs, **rest).params == build_loss(name, **spec).params
    # A study's sampler sees the same names and distributions, trial for trial.
    a = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    b = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(3):
        ta, tb = a.ask(), b.ask()
        kw = sample(ta, space)
        params = search.suggest(tb, cfg)
        assert ta.params == tb.params == params
        assert ta.distributions == tb.distributions
        assert decode_trial_params(space, params) == kw
        assert kw["variant"] == ("hill" if params["variant"] == "alpa_hill" else "plain")
        a.tell(ta, 0.0)
        b.tell(tb, 0.0)


# -- narrow ------------------------------------------------------------------------------------

def test_narrow_ranges_choices_and_fixed_values():
    space, fixed = narrow(loss_search_space("alpa"), {"alpha": [0.75, 1.5], "gamma_pos": 0.0,
                                                      "variant": "alpa_hill"})
    assert space["alpha"] == Real(0.75, 1.5) and "gamma_pos" not in space and "variant" not in space
    assert fixed == {"gamma_pos": 0.0, "variant": "hill"}
    focal, fixed = narrow(loss_search_space("focal"), {"alpha": None})
    assert list(focal) == ["gamma"] and fixed == {"alpha": None}
    # complement: the override is in beta's units
    cb, _ = narrow(loss_search_space("cb"), {"beta": [0.99, 0.9999]})
    assert cb["beta"].low == pytest.approx(1e-4) and cb["beta"].high == pytest.approx(0.01)
    assert cb["beta"].low >= 1e-4 and cb["beta"].log and cb["beta"].complement


def test_narrow_resolves_conditions():
    space = loss_search_space("cb")
    assert "gamma" not in narrow(space, {"base": "ce"})[0]
    assert narrow(space, {"base": "focal"})[0]["gamma"].when is None
    assert "gamma" not in narrow(space, {"base": ["ce", "bce"]})[0]
    assert narrow(space, {"base": ["focal", "ce"]})[0]["gamma"].when == ("base", ("focal",))


@pytest.mark.parametrize("overrides, message", [
    ({"gama_neg": [0, 1]}, r"no parameter 'gama_neg'; declared: alpha, beta, gamma_pos, gamma_neg, variant"),
    ({"alpha": [0.1, 1.0]}, r"alpha=\[0.1, 1\] must be low <= high inside its declared range \[0.5, 2\]"),
    ({"alpha": [1.5, 1.0]}, r"alpha=\[1.5, 1\]"),
    ({"alpha": 3.0}, r"alpha=3.0 lies outside its declared range"),
    ({"alpha": "big"}, r"alpha must be a number"),
    ({"alpha": None}, r"alpha must be a number, got None"),
    ({"variant": ["alpa", "focal"]}, r"variant=\['alpa', 'focal'\] must be distinct values among"),
    ({"variant": ["alpa", "alpa"]}, r"variant="),
    ({"variant": []}, r"variant takes a non-empty list"),
    ({"variant": "hill"}, r"variant='hill' is not one of \['alpa', 'alpa_hill'\]"),
])
def test_narrow_refuses_bad_overrides(overrides, message):
    with pytest.raises(ValueError, match=message):
        narrow(loss_search_space("alpa"), overrides)


def test_narrow_on_an_empty_space_names_none():
    with pytest.raises(ValueError, match=r"no parameter 'gamma'; declared: \(none\)"):
        narrow(loss_search_space("ce"), {"gamma": 1.0})
    assert narrow(loss_search_space("ce"), {}) == ({}, {})


def test_declarations_are_checked():
    with pytest.raises(ValueError, match="log scale"):
        Real(0.0, 1.0, log=True)
    with pytest.raises(ValueError, match="low <= high"):
        Real(2.0, 1.0)
    with pytest.raises(ValueError, match="distinct"):
        Choice(("a", "a"))
    with pytest.raises(ValueError, match="must come earlier"):
        sample(StrictTrial({"g": 1.0, "b": "x"}), {"g": Real(0, 2, when=("b", ("x",))), "b": Choice(("x",))})
