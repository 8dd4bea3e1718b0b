"""One trial: sample a loss setting, cross-validate it, report per fold, record the figures.

Bridges an Optuna trial to :func:`alpa_tune.training.cross_validate` (the one module of the
search that needs torch).
"""

from __future__ import annotations

import math
import os
import socket
import threading
from typing import Any

import numpy as np
import optuna

from alpa_tune.config import StudyConfig
from alpa_tune.data import ImageDataset
from alpa_tune.search import suggest_loss
from alpa_tune.storage import DiskFullError, StorageLost, TrialTakenOver
from alpa_tune.training import EpochStats, FoldResult, NonFiniteLossError, cross_validate, split_holdout


class StopRequested(Exception):
    """Raised inside a trial at an epoch boundary when the worker was asked to stop."""


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Objective:
    """One trial: sample, build the loss, cross-validate, report per fold, record metrics."""

    def __init__(self, config: StudyConfig, dataset: ImageDataset, *, device: Any = None,
                 stop_event: threading.Event | None = None) -> None:
        from alpa_tune.losses import build_for_counts, class_counts_for, needs_class_counts

        self._build_for_counts = build_for_counts
        self._class_counts_for = class_counts_for
        self._needs_class_counts = needs_class_counts
        self.config = config
        self.dataset = dataset
        self.device = device
        self.stop_event = stop_event or threading.Event()

    def __call__(self, trial: optuna.Trial) -> float:
        config = self.config
        trial.set_user_attr("worker", worker_id())  # first: a trial whose worker dies is then traceable
        name, kwargs = suggest_loss(trial, config.search)
        if os.environ.get("SLURM_ARRAY_TASK_ID"):  # which array task ran it, as squeue and scancel name it
            trial.set_user_attr("slurm_task", f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}")
        recorded = dict(kwargs)
        if self._needs_class_counts(name):  # the export's loss is built for the development split; each fold uses its own
            dev, _ = split_holdout(self.dataset, config.training.holdout, config.training.seed)
            counts = np.bincount(self.dataset.labels[dev], minlength=self.dataset.num_classes)
            recorded["class_counts"] = self._class_counts_for(counts)
        trial.set_user_attr("loss", {"name": name, "params": recorded})

        by_epoch = config.search.report == "epoch"
        wilcoxon = config.search.pruner == "wilcoxon"

        def on_epoch(stats: EpochStats) -> None:
            if by_epoch and stats.balanced_accuracy is not None:
                trial.report(stats.balanced_accuracy, step=stats.fold * config.training.epochs + stats.epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at fold {stats.fold}, epoch {stats.epoch}")
            trial.set_user_attr("progress", f"fold {stats.fold + 1}/{config.training.folds}, "
                                            f"epoch {stats.epoch + 1}/{config.training.epochs}")
            if self.stop_event.is_set():
                raise StopRequested(f"worker stopping after fold {stats.fold}, epoch {stats.epoch}")

        def on_fold(result: FoldResult, done: list[FoldResult]) -> None:
            record_folds(trial, done, self.dataset)
            if not by_epoch:
                # Wilcoxon compares paired per-fold scores; the others judge the running mean.
                score = result.balanced_accuracy if wilcoxon else float(np.mean([f.balanced_accuracy for f in done]))
                trial.report(score, step=result.fold)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after fold {result.fold}")

        try:
            result = cross_validate(config, self.dataset, lambda counts: self._build_for_counts(name, kwargs, counts),
                                    on_epoch=on_epoch, on_fold=on_fold, evaluate_each_epoch=by_epoch,
                                    device=self.device)
        except (optuna.TrialPruned, StorageLost, DiskFullError, TrialTakenOver):
            raise
        except StopRequested as exc:
            trial.set_user_attr("fail_reason", f"interrupted ({exc}); queued again")
            raise
        except Exception as exc:
            # The reason travels with the FAIL state so the dashboard and `study show` explain it.
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
            raise
        value = result.mean_balanced_accuracy
        if not math.isfinite(value):
            trial.set_user_attr("fail_reason", "balanced accuracy is not finite")
            raise NonFiniteLossError("balanced accuracy is not finite")
        return value


def record_folds(trial: optuna.Trial, folds: list[FoldResult], dataset: ImageDataset) -> None:
    """Per-fold and per-class figures as user attributes (the dashboard shows them; pruned trials keep them)."""
    trial.set_user_attr("fold_balanced_accuracy", [round(f.balanced_accuracy, 6) for f in folds])
    trial.set_user_attr("fold_macro_f1", [round(f.macro_f1, 6) for f in folds])
    trial.set_user_attr("class_names", list(dataset.class_names))
    trial.set_user_attr("class_recall", _mean_per_class([f.recall for f in folds]))
    trial.set_user_attr("class_f1", _mean_per_class([f.f1 for f in folds]))
    trial.set_user_attr("epoch_seconds", round(float(np.mean([f.epoch_seconds for f in folds])), 4))
    trial.set_user_attr("images_per_second", round(float(np.mean([f.images_per_second for f in folds])), 2))
    trial.set_user_attr("device", folds[-1].device)
    trial.set_user_attr("dataset_fingerprint", dataset.fingerprint)


def _mean_per_class(rows: list[list[float]]) -> list[float | None]:
    """Mean over folds per class; None where a class never appeared in a validation fold."""
    matrix = np.array(rows, dtype=np.float64)
    seen = np.isfinite(matrix)
    sums = np.where(seen, matrix, 0.0).sum(axis=0)
    counts = seen.sum(axis=0)
    return [round(float(s / n), 6) if n else None for s, n in zip(sums, counts)]

