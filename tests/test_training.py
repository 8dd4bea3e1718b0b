"""Cross-validation: hold-out never touched, stratified folds, a fresh model per fold, NaN stops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alpa_tune import training
from alpa_tune.config import StudyConfig
from alpa_tune.data import DataError, load_dataset
from alpa_tune.training import NonFiniteLossError, cross_validate, make_folds, split_holdout


class SoftmaxCE(torch.nn.Module):
    """A plain loss for exercising the loop (the loss library has its own tests)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, target, reduction="sum")


def tiny(*overrides: str) -> StudyConfig:
    return StudyConfig(name="t").replace([
        "data.source=synthetic", "data.image_size=16", "data.num_classes=4", "data.samples_per_class=30",
        "data.imbalance_ratio=3.0", "training.folds=2", "training.epochs=1", "training.batch_size=32",
        *overrides,
    ])


def test_holdout_is_stratified_disjoint_and_fixed() -> None:
    config = tiny()
    dataset = load_dataset(config.data)
    dev, held = split_holdout(dataset, 0.2, seed=0)
    assert not set(dev) & set(held)
    assert len(dev) + len(held) == len(dataset.labels)
    assert set(np.unique(dataset.labels[held])) == set(range(4))  # every class held out
    dev2, held2 = split_holdout(dataset, 0.2, seed=0)
    assert np.array_equal(held, held2)
    for train_index, val_index in make_folds(dataset, dev, 2, seed=0):
        assert not set(train_index) & set(held) and not set(val_index) & set(held)
        assert not set(train_index) & set(val_index)


def test_class_smaller_than_folds_is_named() -> None:
    config = tiny("data.samples_per_class=10", "data.imbalance_ratio=5.0")  # counts 10, 6, 3, 2
    dataset = load_dataset(config.data)
    dev, _ = split_holdout(dataset, 0.2, seed=0)
    with pytest.raises(DataError, match=r"class 'class_3' has 1 sample\(s\) after the hold-out, fewer than training.folds = 3"):
        make_folds(dataset, dev, 3, seed=0)


def test_fresh_model_and_loss_per_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny("training.folds=3")
    dataset = load_dataset(config.data)
    created: list[torch.nn.Module] = []
    real_create = training.create_model

    def recording_create(*args, **kwargs):
        model = real_create(*args, **kwargs)
        created.append(model)
        return model

    monkeypatch.setattr(training, "create_model", recording_create)
    losses_built = []
    result = cross_validate(config, dataset, lambda counts: losses_built.append(counts) or SoftmaxCE())
    assert len(result.folds) == 3
    assert len({id(m) for m in created}) == 3
    assert len(losses_built) == 3 and all(c.sum() > 0 for c in losses_built)
    # Each fold starts from the same seeded initialisation, not from the previous fold's weights.
    assert created[0] is not created[1]


def test_learns_the_synthetic_classes_and_reports_progress() -> None:
    config = tiny("training.epochs=4", "training.augment=false")  # 16 px squares: erasing would hide them
    dataset = load_dataset(config.data)
    epochs, folds = [], []
    result = cross_validate(config, dataset, lambda counts: SoftmaxCE(),
                            on_epoch=epochs.append, on_fold=lambda r, done: folds.append(len(done)),
                            evaluate_each_epoch=True)
    assert [(e.fold, e.epoch) for e in epochs] == [(f, e) for f in range(2) for e in range(4)]
    assert all(e.balanced_accuracy is not None for e in epochs)
    assert folds == [1, 2]
    assert result.mean_balanced_accuracy > 0.5  # chance is 0.25
    assert len(result.folds[0].recall) == 4 and len(result.folds[0].f1) == 4


def test_same_seed_same_result() -> None:
    config = tiny()
    dataset = load_dataset(config.data)
    first = cross_validate(config, dataset, lambda counts: SoftmaxCE())
    second = cross_validate(config, dataset, lambda counts: SoftmaxCE())
    assert [f.balanced_accuracy for f in first.folds] == [f.balanced_accuracy for f in second.folds]


def test_non_finite_loss_stops_the_trial() -> None:
    class Exploding(torch.nn.Module):
        def forward(self, logits, target):
            return logits.sum() * float("nan")

    config = tiny()
    with pytest.raises(NonFiniteLossError, match="fold 0, epoch 0"):
        cross_validate(config, load_dataset(config.data), lambda counts: Exploding())
