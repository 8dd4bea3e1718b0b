"""Cross-validation: hold-out never touched, stratified folds, a fresh model per fold, NaN stops;
the read-ahead input and the losses kept on the device change nothing in the result."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from alpa_tune import augment, training
from alpa_tune.config import StudyConfig
from alpa_tune.data import DataError, ImageDataset, load_dataset
from alpa_tune.metrics import class_metrics
from alpa_tune.models import create_model
from alpa_tune.training import (
    BatchReader,
    NonFiniteLossError,
    Trainer,
    cross_validate,
    make_folds,
    split_holdout,
    train_and_evaluate,
)


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


class GoesBad(torch.nn.Module):
    """Cross-entropy for the first ``bad_from`` calls, then ``value`` (still attached to the graph)."""

    def __init__(self, bad_from: int, value: float = float("nan")) -> None:
        super().__init__()
        self.bad_from, self.value, self.calls = bad_from, value, 0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.bad_from:
            return logits.sum() * 0 + self.value
        return torch.nn.functional.cross_entropy(logits, target, reduction="sum")


def test_non_finite_loss_stops_the_trial() -> None:
    config = tiny()
    with pytest.raises(NonFiniteLossError, match=r"^loss became nan in fold 0, epoch 0, step 0$"):
        cross_validate(config, load_dataset(config.data), lambda counts: GoesBad(0))


def test_a_later_non_finite_loss_names_its_epoch_and_step() -> None:
    config = tiny("training.batch_size=8")  # 30 training images per fold: 4 steps per epoch
    epochs = []
    with pytest.raises(NonFiniteLossError, match=r"^loss became inf in fold 0, epoch 1, step 2$"):
        cross_validate(config.replace(["training.epochs=3"]), load_dataset(config.data),
                       lambda counts: GoesBad(4 + 2, float("inf")), on_epoch=epochs.append)
    assert [e.epoch for e in epochs] == [0]  # the diverged epoch is never reported


def _fold(config: StudyConfig) -> tuple[ImageDataset, np.ndarray, np.ndarray]:
    dataset = load_dataset(config.data)
    dev, _ = split_holdout(dataset, config.training.holdout, config.training.seed)
    train_index, eval_index = make_folds(dataset, dev, config.training.folds, config.training.seed)[0]
    return dataset, train_index, eval_index


def _direct_batches(dataset: ImageDataset, index: np.ndarray, batch_size: int) -> list:
    return [(torch.from_numpy(dataset.images[b]), torch.from_numpy(dataset.labels[b]))
            for b in np.array_split(index, range(batch_size, len(index), batch_size))]


def test_losses_read_every_k_steps_name_the_first_bad_step_and_sum_alike() -> None:
    # On a GPU the losses are read every LOSS_READ_STEPS steps; here the same schedule on CPU.
    config = tiny("training.batch_size=4")
    dataset, train_index, _ = _fold(config)
    batches = _direct_batches(dataset, train_index, 4)[:6]
    counts = dataset.class_counts()

    def trainer(loss: torch.nn.Module, read_steps: int) -> Trainer:
        t = Trainer(config, counts, lambda c: loss, seed=5, device=torch.device("cpu"), steps_per_epoch=6)
        t.loss_read_steps = read_steps
        return t

    bad = GoesBad(1)
    with pytest.raises(NonFiniteLossError, match=r"^loss became nan in fold 2, epoch 3, step 1$"):
        trainer(bad, 4).train_epoch(batches, fold=2, epoch=3)
    assert bad.calls == 4  # trained on until the first read, which still names step 1
    every_step = trainer(GoesBad(99), 1).train_epoch(batches)
    every_fourth = trainer(GoesBad(99), 4).train_epoch(batches)
    assert every_fourth.train_loss == every_step.train_loss and np.isfinite(every_step.train_loss)


def test_training_equals_the_direct_synchronous_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same seed, same result as the loop before the reader: batches read one by one in the
    seeded order, each loss read back at its step. Weights, losses and metrics bit for bit."""
    config = tiny("training.batch_size=8", "training.epochs=2", "training.weight_decay=0.01")
    dataset, train_index, eval_index = _fold(config)
    t, seed = config.training, 11

    torch.manual_seed(seed)
    shuffle, draws = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    model = create_model(config.model.backbone, dataset.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    expected_reads, expected_losses = [], []
    for _ in range(t.epochs):
        model.train()
        order = train_index[torch.randperm(len(train_index), generator=shuffle).numpy()]
        total = 0.0
        for start in range(0, len(order), t.batch_size):
            index = np.sort(order[start : start + t.batch_size])
            expected_reads.append(index)
            loss = SoftmaxCE()(model(augment.train_transform(torch.from_numpy(dataset.images[index]), draws)),
                               torch.from_numpy(dataset.labels[index]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        expected_losses.append(total / len(order))
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(augment.eval_transform(images)).argmax(1)
                               for images, _ in _direct_batches(dataset, eval_index, t.batch_size)])
    expected = class_metrics(dataset.labels[eval_index], predicted.numpy(), dataset.num_classes)

    models, reads = [], []
    real_create, real_load = training.create_model, BatchReader._load
    monkeypatch.setattr(training, "create_model", lambda *a, **k: models.append(real_create(*a, **k)) or models[-1])
    monkeypatch.setattr(BatchReader, "_load", lambda self, index: reads.append(index) or real_load(self, index))
    result = train_and_evaluate(config, dataset, train_index, eval_index, lambda counts: SoftmaxCE(),
                                seed=seed, device=torch.device("cpu"))

    train_reads = reads[: len(expected_reads)]
    assert all(np.array_equal(a, b) for a, b in zip(train_reads, expected_reads, strict=True))
    assert [e.train_loss for e in result.epochs] == expected_losses
    state, reference = models[0].state_dict(), model.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert (result.balanced_accuracy, result.recall) == (expected.balanced_accuracy, expected.recall)


def _memmap_dataset(folder: Path, n: int = 21) -> ImageDataset:
    path = folder / "images.npy"
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 6, 5, 3))
    images[:] = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    images.flush()
    labels = np.arange(n, dtype=np.int64) % 3
    return ImageDataset(np.load(path, mmap_mode="r"), labels, ["a", "b", "c"], "test")


def test_reader_yields_the_direct_batches_in_order_reading_one_ahead(tmp_path: Path) -> None:
    dataset = _memmap_dataset(tmp_path)
    batches = [np.array([3, 1, 20]), np.array([0, 0, 5]), np.arange(7, 15), np.array([2])]  # any order, repeats
    started = [threading.Event() for _ in batches]
    with BatchReader(dataset, torch.device("cpu"), pin_memory=False) as reader:
        real_load = reader._load

        def load(index: np.ndarray):
            started[next(k for k, b in enumerate(batches) if b is index)].set()
            return real_load(index)

        reader._load = load
        for k, (images, labels) in enumerate(reader.read(batches)):
            assert images.dtype == torch.uint8 and images.is_contiguous()
            assert torch.equal(images, torch.from_numpy(dataset.images[batches[k]]))
            assert torch.equal(labels, torch.from_numpy(dataset.labels[batches[k]]))
            if k + 1 < len(batches):  # while batch k is in use, batch k + 1 is already being read
                assert started[k + 1].wait(timeout=10)
        assert k == len(batches) - 1
        assert list(reader.read([])) == []


def test_reader_refuses_an_index_out_of_range(tmp_path: Path) -> None:
    dataset = _memmap_dataset(tmp_path)
    with BatchReader(dataset, torch.device("cpu"), pin_memory=False) as reader:
        batches = reader.read([np.array([0, 1]), np.array([4, 21])])
        next(batches)
        with pytest.raises(IndexError, match="out of range for 21 images"):
            next(batches)
