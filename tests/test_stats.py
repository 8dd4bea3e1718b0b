"""The paired, stratified, two-level bootstrap of alpa_tune.stats and its one-line verdict."""

from __future__ import annotations

import time

import numpy as np
import pytest

from alpa_tune.metrics import class_metrics
from alpa_tune.stats import LossStats, paired_bootstrap, verdict


def _noisy(rng: np.random.Generator, y: np.ndarray, right: float, classes: int) -> np.ndarray:
    """Predictions right on about a fraction ``right`` of the images, a wrong class elsewhere."""
    wrong = (y + rng.integers(1, classes, size=y.size)) % classes
    return np.where(rng.random(y.size) < right, y, wrong)


def _by_label(stats: list[LossStats]) -> dict[str, LossStats]:
    return {s.label: s for s in stats}


# (a) hand-computed

def test_hand_computed_means_and_differences() -> None:
    # Class 0 has 4 images, class 1 has 2. Balanced accuracy = (recall_0 + recall_1) / 2.
    y = np.array([0, 0, 0, 0, 1, 1])
    a = np.array([0, 0, 0, 1, 1, 0])  # recall 3/4 and 1/2 -> 0.625
    b = np.array([0, 0, 1, 1, 1, 1])  # recall 2/4 and 2/2 -> 0.75
    by = _by_label(paired_bootstrap(y, {"a": [a], "b": [b]}, replicates=200))
    assert by["a"].mean == 0.625 and by["b"].mean == 0.75
    assert by["b"].best and not by["a"].best
    assert by["b"].difference == 0.0 and by["a"].difference == -0.125


def test_means_agree_with_class_metrics_over_seeds() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, size=150)
    runs = [_noisy(rng, y, 0.7, 4) for _ in range(3)]
    (stat,) = paired_bootstrap(y, {"ce": runs}, replicates=50)
    expected = np.mean([class_metrics(y, p, 4).balanced_accuracy for p in runs])
    assert stat.mean == pytest.approx(expected, abs=1e-15)


def test_a_loss_right_wherever_the_other_is_has_a_difference_interval_at_or_above_zero() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, size=300)
    weak = _noisy(rng, y, 0.6, 3)
    strong = np.where(rng.random(y.size) < 0.5, y, weak)  # weak's hits kept, some misses fixed
    assert ((weak == y) <= (strong == y)).all()
    by = _by_label(paired_bootstrap(y, {"weak": [weak], "strong": [strong]}))
    assert by["strong"].best
    # The weak loss can never beat the strong one in a replicate: its difference is <= 0 throughout.
    assert by["weak"].difference_ci95[1] <= 0.0
    assert by["weak"].difference < 0


# (b) identical losses

def test_identical_losses_differ_by_exactly_zero() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 5, size=400)
    runs = [_noisy(rng, y, 0.7, 5) for _ in range(3)]
    stats = paired_bootstrap(y, {"ce": runs, "focal": [r.copy() for r in runs]})
    by = _by_label(stats)
    assert by["ce"].best and not by["focal"].best  # tie broken by label order
    assert by["focal"].difference == 0.0
    assert by["focal"].difference_ci95 == (0.0, 0.0)
    assert not by["focal"].distinguishable and not by["ce"].distinguishable
    assert by["ce"].ci95 == by["focal"].ci95
    assert verdict(stats).startswith("The data cannot rank the losses: ce has the highest mean")


# (c) a clearly better loss

def test_a_clearly_better_loss_is_distinguishable() -> None:
    rng = np.random.default_rng(6)
    y = rng.integers(0, 4, size=400)
    preds = {"ce": [_noisy(rng, y, 0.5, 4) for _ in range(3)], "alpa": [_noisy(rng, y, 0.95, 4) for _ in range(3)]}
    by = _by_label(paired_bootstrap(y, preds))
    assert by["alpa"].best and not by["alpa"].distinguishable
    assert by["ce"].distinguishable and by["ce"].difference_ci95[1] < 0
    assert by["alpa"].difference == 0.0 and by["alpa"].difference_ci95 == (0.0, 0.0)


# (d) determinism

def test_same_seed_same_result_and_another_seed_another() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, size=200)
    preds = {k: [_noisy(rng, y, r, 3) for _ in range(2)] for k, r in (("ce", 0.6), ("focal", 0.65))}
    first = paired_bootstrap(y, preds, replicates=300, seed=11)
    assert first == paired_bootstrap(y, preds, replicates=300, seed=11)
    assert first != paired_bootstrap(y, preds, replicates=300, seed=12)


def test_replicates_spanning_several_blocks() -> None:
    # More replicates than one block holds: still runs, still deterministic, intervals sane.
    rng = np.random.default_rng(8)
    y = rng.integers(0, 2, size=5000)
    preds = {"ce": [_noisy(rng, y, 0.8, 2)]}
    a = paired_bootstrap(y, preds, replicates=1500, seed=1)
    assert a == paired_bootstrap(y, preds, replicates=1500, seed=1)
    assert a[0].ci95[0] < a[0].mean < a[0].ci95[1]


# (e) intervals contain the observed values

@pytest.mark.parametrize("seeds", [1, 2, 5])
def test_intervals_contain_the_observed_mean_and_difference(seeds: int) -> None:
    rng = np.random.default_rng(9 + seeds)
    y = rng.integers(0, 5, size=500)
    preds = {k: [_noisy(rng, y, r, 5) for _ in range(seeds)] for k, r in (("ce", 0.6), ("focal", 0.62), ("alpa", 0.7))}
    for s in paired_bootstrap(y, preds):
        assert s.ci95[0] <= s.mean <= s.ci95[1]
        assert s.difference_ci95[0] <= s.difference <= s.difference_ci95[1]
        assert 0.0 <= s.ci95[0] <= s.ci95[1] <= 1.0


def test_one_seed_keeps_the_seed_level_a_no_op() -> None:
    # With S == 1 only images are resampled: a perfect loss stays at exactly 1.
    y = np.array([0, 1, 1, 2, 2, 2])
    (stat,) = paired_bootstrap(y, {"ce": [y.copy()]}, replicates=100)
    assert stat.mean == 1.0 and stat.ci95 == (1.0, 1.0)


def test_stratified_a_rare_class_keeps_its_weight() -> None:
    # One image of class 1 (always wrong), 99 of class 0 (always right): every stratified replicate
    # keeps that image, so balanced accuracy is exactly 0.5 throughout.
    y = np.array([0] * 99 + [1])
    (stat,) = paired_bootstrap(y, {"ce": [np.zeros(100, dtype=int)]}, replicates=200)
    assert stat.mean == 0.5 and stat.ci95 == (0.5, 0.5)


def test_eight_losses_five_seeds_two_thousand_images_take_well_under_a_second() -> None:
    rng = np.random.default_rng(10)
    y = rng.integers(0, 10, size=2000)
    preds = {f"l{k}": [_noisy(rng, y, 0.6 + 0.03 * k, 10) for _ in range(5)] for k in range(8)}
    paired_bootstrap(y, preds, replicates=20)  # warm-up: imports and BLAS start-up
    start = time.perf_counter()
    paired_bootstrap(y, preds, replicates=2000)
    assert time.perf_counter() - start < 1.0


# (f) bad input

@pytest.mark.parametrize(("targets", "predictions", "message"), [
    (np.array([], dtype=int), {"ce": [np.array([], dtype=int)]}, "targets: empty"),
    (np.array([0, 1]), {}, "predictions: no losses given"),
    (np.array([0, 1]), {"ce": []}, r"predictions\['ce'\]: no seeds"),
    (np.array([0, 1]), {"ce": [np.array([0, 1])], "focal": [np.array([0, 1])] * 2},
     "every loss needs the same seeds .*ce has 1, focal has 2"),
    (np.array([0, 1, 1]), {"ce": [np.array([0, 1])]}, r"predictions\['ce'\]\[0\]: 2 predictions for 3 targets"),
    (np.array([[0, 1]]), {"ce": [np.array([0, 1])]}, "targets: expected a 1-D array"),
    (np.array([0.0, 1.0]), {"ce": [np.array([0, 1])]}, "targets: expected integer class indices"),
    (np.array([0, -1]), {"ce": [np.array([0, 1])]}, "targets: class indices must be >= 0"),
])
def test_bad_input_is_refused_with_a_clear_message(targets: np.ndarray, predictions: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(targets, predictions)


def test_bad_replicate_count_and_empty_verdict_are_refused() -> None:
    with pytest.raises(ValueError, match="replicates: must be >= 1"):
        paired_bootstrap(np.array([0, 1]), {"ce": [np.array([0, 1])]}, replicates=0)
    with pytest.raises(ValueError, match="no losses"):
        verdict([])


# (g) verdict wording

def _stat(label: str, mean: float, diff_ci: tuple[float, float], best: bool = False,
          ci: tuple[float, float] | None = None) -> LossStats:
    return LossStats(label, mean, ci or (mean - 0.01, mean + 0.01), mean - 0.97, diff_ci, best,
                     not best and not diff_ci[0] <= 0 <= diff_ci[1])


def test_verdict_names_the_best_the_indistinguishable_and_the_worse() -> None:
    stats = [_stat("ce", 0.90, (-0.1, -0.02)), _stat("focal", 0.97, (0.0, 0.0), best=True),
             _stat("bce", 0.96, (-0.03, 0.01)), _stat("cb", 0.95, (-0.04, 0.005)), _stat("ldam", 0.91, (-0.08, -0.01))]
    assert verdict(stats) == ("focal is best (97.0 %); bce, cb are not distinguishable from it; ce, ldam are worse "
                              "(their 95 % interval of difference excludes 0).")


def test_verdict_singular_and_without_indistinguishable() -> None:
    stats = [_stat("alpa", 0.97, (0.0, 0.0), best=True), _stat("ce", 0.80, (-0.2, -0.1))]
    assert verdict(stats) == "alpa is best (97.0 %); ce is worse (its 95 % interval of difference excludes 0)."
    stats.append(_stat("focal", 0.96, (-0.02, 0.01)))
    assert "; focal is not distinguishable from it;" in verdict(stats)


def test_verdict_when_nothing_can_be_ranked_and_when_there_is_one_loss() -> None:
    stats = [_stat("ce", 0.96, (-0.03, 0.01)), _stat("alpa", 0.97, (0.0, 0.0), best=True)]
    assert verdict(stats) == ("The data cannot rank the losses: alpa has the highest mean (97.0 %), "
                              "but every 95 % interval of difference to it covers 0.")
    assert verdict([_stat("alpa", 0.97, (0.0, 0.0), best=True)]).startswith("alpa is the only loss (97.0 %)")


def test_verdict_flags_a_small_held_out_split() -> None:
    stats = [_stat("ce", 0.6, (-0.3, 0.1), ci=(0.45, 0.72)), _stat("alpa", 0.7, (0.0, 0.0), best=True, ci=(0.6, 0.8))]
    line = verdict(stats)
    assert line.startswith("The data cannot rank the losses")
    assert line.endswith("The held-out split is small (the widest 95 % interval of a mean spans 27.0 points); "
                         "raise training.holdout for a sharper comparison.")
    assert "held-out split is small" not in verdict(stats, wide=0.30)


def test_verdict_on_real_bootstrap_output() -> None:
    rng = np.random.default_rng(12)
    y = rng.integers(0, 4, size=400)
    preds = {"ce": [_noisy(rng, y, 0.5, 4) for _ in range(3)], "alpa": [_noisy(rng, y, 0.95, 4) for _ in range(3)]}
    line = verdict(paired_bootstrap(y, preds))
    assert line.startswith("alpa is best (9") and "ce is worse" in line and "small" not in line
    # 20 images, 1 seed, close losses: cannot rank, and the split is flagged as small.
    y = rng.integers(0, 2, size=20)
    line = verdict(paired_bootstrap(y, {"ce": [_noisy(rng, y, 0.7, 2)], "focal": [_noisy(rng, y, 0.7, 2)]}))
    assert line.startswith("The data cannot rank the losses") and "training.holdout" in line
