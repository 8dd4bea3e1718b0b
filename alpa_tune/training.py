"""Stratified hold-out + k-fold cross-validation of a timm backbone under a given loss.

Knows nothing of Optuna: progress goes out through callbacks, which may raise to stop
(pruning, a shutdown signal). A fresh model and optimizer for every fold.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split

from alpa_tune import augment
from alpa_tune.config import StudyConfig, TrainingConfig
from alpa_tune.data import DataError, ImageDataset
from alpa_tune.metrics import ClassMetrics, class_metrics
from alpa_tune.models import create_model

LossFactory = Callable[[np.ndarray], torch.nn.Module]  # train class counts -> loss module


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: this hyperparameter setting cannot train."""


@dataclass
class EpochStats:
    fold: int
    epoch: int
    train_loss: float
    seconds: float
    images_per_second: float
    balanced_accuracy: float | None = None  # on the validation fold, when evaluated per epoch


@dataclass
class FoldResult:
    fold: int
    balanced_accuracy: float
    macro_f1: float
    recall: list[float]
    f1: list[float]
    epoch_seconds: float  # mean over the fold's epochs
    images_per_second: float
    device: str
    epochs: list[EpochStats] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CrossValidationResult:
    folds: list[FoldResult]

    @property
    def mean_balanced_accuracy(self) -> float:
        return float(np.mean([f.balanced_accuracy for f in self.folds]))


EpochCallback = Callable[[EpochStats], None]
FoldCallback = Callable[[FoldResult, list[FoldResult]], None]


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"training.device: {spec!r} asked for, but no CUDA device is available")
    return device


def split_holdout(dataset: ImageDataset, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(development indices, hold-out indices); stratified, fixed seed, never used for tuning."""
    everything = np.arange(len(dataset.labels))
    if dataset.holdout_index is not None:
        held = np.sort(dataset.holdout_index)
        return np.setdiff1d(everything, held), held
    counts = dataset.class_counts()
    for c, n in enumerate(counts):
        if n < 2:
            raise DataError(
                f"class {dataset.class_names[c]!r} has {n} sample(s); at least 2 are needed to hold one out"
            )
    dev, held = train_test_split(everything, test_size=holdout, stratify=dataset.labels, random_state=seed)
    return np.sort(dev), np.sort(held)


def make_folds(dataset: ImageDataset, dev_index: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold over the development indices; refuses a class too small for the folds."""
    labels = dataset.labels[dev_index]
    counts = np.bincount(labels, minlength=dataset.num_classes)
    c = int(np.argmin(counts))  # name the smallest class: fixing it fixes the rest
    n = int(counts[c])
    if n < folds:
        raise DataError(
            f"class {dataset.class_names[c]!r} has {n} sample(s) after the hold-out, "
            f"fewer than training.folds = {folds}"
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(dev_index[tr], dev_index[va]) for tr, va in splitter.split(dev_index, labels)]


def fold_seed(base_seed: int, fold: int) -> int:
    """Same seed for the same fold in every trial: trials differ only by their loss, and re-run exactly."""
    return base_seed * 1000 + fold


def cross_validate(
    config: StudyConfig,
    dataset: ImageDataset,
    loss_factory: LossFactory,
    *,
    on_epoch: EpochCallback | None = None,
    on_fold: FoldCallback | None = None,
    evaluate_each_epoch: bool = False,
    device: torch.device | None = None,
) -> CrossValidationResult:
    """Hold out ``training.holdout`` (untouched), k-fold the rest, train a fresh model per fold."""
    t = config.training
    device = device or resolve_device(t.device)
    dev_index, _ = split_holdout(dataset, t.holdout, t.seed)
    results: list[FoldResult] = []
    for fold, (train_index, val_index) in enumerate(make_folds(dataset, dev_index, t.folds, t.seed)):
        result = train_and_evaluate(
            config, dataset, train_index, val_index, loss_factory,
            seed=fold_seed(t.seed, fold), fold=fold, device=device,
            on_epoch=on_epoch, evaluate_each_epoch=evaluate_each_epoch,
        )
        results.append(result)
        if on_fold:
            on_fold(result, results)
    return CrossValidationResult(results)


def train_and_evaluate(
    config: StudyConfig,
    dataset: ImageDataset,
    train_index: np.ndarray,
    eval_index: np.ndarray,
    loss_factory: LossFactory,
    *,
    seed: int,
    fold: int = 0,
    device: torch.device,
    on_epoch: EpochCallback | None = None,
    evaluate_each_epoch: bool = False,
) -> FoldResult:
    """Train a fresh model on ``train_index``, then score it on ``eval_index``."""
    t = config.training
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)  # shuffling, on the CPU
    # Augmentation draws on the batch's device; its own seeded generator makes a fold re-runnable.
    augment_generator = torch.Generator(device=device).manual_seed(seed)
    model = create_model(config.model.backbone, dataset.num_classes, pretrained=config.model.pretrained,
                         checkpoint=config.model.checkpoint, drop_rate=config.model.drop_rate).to(device)
    channels_last = t.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_model = torch.compile(model) if t.compile else model
    loss_fn = loss_factory(np.bincount(dataset.labels[train_index], minlength=dataset.num_classes)).to(device)
    optimizer = _make_optimizer(model, t)
    steps_per_epoch = math.ceil(len(train_index) / t.batch_size)
    scheduler = _make_scheduler(optimizer, t, steps_per_epoch)
    amp_dtype = _amp_dtype(t.amp, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    epochs: list[EpochStats] = []
    for epoch in range(t.epochs):
        if hasattr(loss_fn, "set_epoch"):
            loss_fn.set_epoch(epoch)  # LDAM's deferred re-weighting switches on at its epoch
        model.train()
        started = time.perf_counter()
        order = train_index[torch.randperm(len(train_index), generator=generator).numpy()]
        total_loss, seen = 0.0, 0
        for start in range(0, len(order), t.batch_size):
            batch_index = np.sort(order[start : start + t.batch_size])  # sorted reads are kinder to a memmap
            images, targets = _batch(dataset, batch_index, device)
            images = augment.train_transform(images, augment_generator) if t.augment else augment.eval_transform(images)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = train_model(images)
            loss = loss_fn(logits.float(), targets)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss became {loss.item()} in fold {fold}, epoch {epoch}, step {start // t.batch_size}")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                _clip(model, t.grad_clip)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                _clip(model, t.grad_clip)
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total_loss += loss.item()
            seen += len(batch_index)
        seconds = time.perf_counter() - started
        stats = EpochStats(fold, epoch, total_loss / max(seen, 1), seconds, seen / max(seconds, 1e-9))
        if evaluate_each_epoch:
            stats.balanced_accuracy = _score(model, dataset, eval_index, device, t.batch_size).balanced_accuracy
        epochs.append(stats)
        if on_epoch:
            on_epoch(stats)

    metrics = _score(model, dataset, eval_index, device, t.batch_size)
    return FoldResult(
        fold=fold,
        balanced_accuracy=metrics.balanced_accuracy,
        macro_f1=metrics.macro_f1,
        recall=metrics.recall,
        f1=metrics.f1,
        epoch_seconds=float(np.mean([e.seconds for e in epochs])),
        images_per_second=float(np.mean([e.images_per_second for e in epochs])),
        device=str(device),
        epochs=epochs,
    )


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: ImageDataset, index: np.ndarray, device: torch.device,
            batch_size: int) -> np.ndarray:
    """Predicted class per index, no augmentation."""
    model.eval()
    predictions = []
    for start in range(0, len(index), batch_size):
        images, _ = _batch(dataset, index[start : start + batch_size], device)
        predictions.append(model(augment.eval_transform(images)).argmax(dim=1).cpu())
    return torch.cat(predictions).numpy() if predictions else np.empty(0, dtype=np.int64)


def _score(model: torch.nn.Module, dataset: ImageDataset, index: np.ndarray, device: torch.device,
           batch_size: int) -> ClassMetrics:
    predicted = predict(model, dataset, index, device, batch_size)
    return class_metrics(dataset.labels[index], predicted, dataset.num_classes)


def _batch(dataset: ImageDataset, index: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # uint8 BHWC goes to the device (4x less traffic than float); permuted to BCHW there it is
    # already in channels_last layout.
    images = torch.from_numpy(np.ascontiguousarray(dataset.images[index])).to(device, non_blocking=True)
    targets = torch.from_numpy(dataset.labels[index]).to(device, non_blocking=True)
    return images, targets


def _make_optimizer(model: torch.nn.Module, t: TrainingConfig) -> torch.optim.Optimizer:
    optimizer_class = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def _make_scheduler(optimizer: torch.optim.Optimizer, t: TrainingConfig, steps_per_epoch: int):
    if t.scheduler == "none":
        return None
    warmup = t.warmup_epochs * steps_per_epoch
    total = max(t.epochs * steps_per_epoch, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "fp16":
        return torch.float16
    return torch.bfloat16


def _clip(model: torch.nn.Module, max_norm: float) -> None:
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
