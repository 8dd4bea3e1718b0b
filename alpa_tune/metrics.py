"""Classification metrics for long-tailed data: balanced accuracy, per-class recall and F1."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClassMetrics:
    balanced_accuracy: float  # mean recall over the classes present in y_true
    macro_f1: float  # mean F1 over the classes present in y_true
    recall: list[float]  # length C; classes absent from y_true get NaN
    f1: list[float]
    support: list[int]


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    index = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def balanced_accuracy_from_hits(hits: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Balanced accuracy from per-class correct counts: ``hits`` (..., C), ``support`` (C,).

    The one place the mean over present classes is taken: :func:`class_metrics` calls it on one
    confusion diagonal, :mod:`alpa_tune.stats` on a batch of bootstrap replicates (stratified
    resampling keeps ``support``, so only the hits change). NaN when no class is present.
    """
    support = np.asarray(support)
    present = support > 0
    if not present.any():
        return np.full(np.shape(hits)[:-1], np.nan)
    recall = np.asarray(hits, dtype=np.float64)[..., present] / support[present]
    return recall.mean(axis=-1)


def class_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> ClassMetrics:
    matrix = confusion(y_true, y_pred, num_classes)
    true_positive = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    present = support > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(present, true_positive / np.maximum(support, 1), np.nan)
        # F1 = 2TP / (2TP + FP + FN) = 2TP / (support + predicted)
        f1 = np.where(present, 2 * true_positive / np.maximum(support + predicted, 1), np.nan)
    return ClassMetrics(
        balanced_accuracy=float(balanced_accuracy_from_hits(true_positive, support)),
        macro_f1=float(f1[present].mean()) if present.any() else float("nan"),
        recall=[float(v) for v in recall],
        f1=[float(v) for v in f1],
        support=[int(v) for v in support],
    )


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    return class_metrics(y_true, y_pred, num_classes).balanced_accuracy
