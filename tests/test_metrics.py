"""Metrics against scikit-learn's independent implementations."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score

from alpa_tune.metrics import class_metrics


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_on_random_predictions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 6, size=200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 6, size=200))
    metrics = class_metrics(y_true, y_pred, 6)
    assert metrics.balanced_accuracy == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert metrics.recall == pytest.approx(list(recall_score(y_true, y_pred, average=None, labels=range(6))))
    assert metrics.f1 == pytest.approx(list(f1_score(y_true, y_pred, average=None, labels=range(6))))
    assert metrics.macro_f1 == pytest.approx(f1_score(y_true, y_pred, average="macro"))


def test_classes_absent_from_truth_are_left_out_of_the_mean() -> None:
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 2, 1, 1])  # class 2 predicted, never true
    metrics = class_metrics(y_true, y_pred, 3)
    assert metrics.balanced_accuracy == pytest.approx((0.5 + 1.0) / 2)
    assert np.isnan(metrics.recall[2]) and np.isnan(metrics.f1[2])
    assert metrics.support == [2, 2, 0]
