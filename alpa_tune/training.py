"""Stratified hold-out + k-fold cross-validation of a timm backbone under a given loss.

Knows nothing of Optuna: progress goes out through callbacks, which may raise to stop
(pruning, a shutdown signal). A fresh model and optimizer for every fold.

On a GPU an epoch keeps the device busy: the next batch is read and copied while the current
one trains (:class:`BatchReader`), and the host waits for the device only to read the losses,
every :data:`LOSS_READ_STEPS` steps (:class:`Trainer`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split

from alpa_tune import augment
from alpa_tune.config import StudyConfig, TrainingConfig
from alpa_tune.data import DataError, ImageDataset
from alpa_tune.metrics import ClassMetrics, class_metrics
from alpa_tune.models import create_model, model_head

LossFactory = Callable[[np.ndarray], torch.nn.Module]  # train class counts -> loss module

# On a GPU, steps between two reads of the losses (each read waits for the device to catch up):
# a diverging trial stops at most this many steps after its first non-finite loss, and the
# reason still names that step. On CPU the losses are read every step.
LOSS_READ_STEPS = 25


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
    predictions: list[int] = field(default_factory=list)  # predicted class per evaluated image, in order

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
    generator = torch.Generator().manual_seed(seed)  # shuffling, on the CPU
    trainer = Trainer(config, np.bincount(dataset.labels[train_index], minlength=dataset.num_classes), loss_factory,
                      seed=seed, device=device, steps_per_epoch=math.ceil(len(train_index) / t.batch_size))
    epochs: list[EpochStats] = []
    with BatchReader(dataset, device) as reader:
        for epoch in range(t.epochs):
            batches = epoch_batches(train_index, t.batch_size, generator)
            stats = trainer.train_epoch(reader.read(batches), fold=fold, epoch=epoch)
            if evaluate_each_epoch:
                stats.balanced_accuracy = trainer.score(reader, eval_index, t.batch_size).balanced_accuracy
            epochs.append(stats)
            if on_epoch:
                on_epoch(stats)
        predicted = trainer.predict(reader, eval_index, t.batch_size)
    metrics = class_metrics(dataset.labels[eval_index], predicted, dataset.num_classes)
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
        predictions=predicted.tolist(),
    )


def epoch_batches(train_index: np.ndarray, batch_size: int, generator: torch.Generator) -> list[np.ndarray]:
    """One epoch's batches: a shuffle drawn from ``generator``, each batch's indices sorted (kinder to a memmap)."""
    order = train_index[torch.randperm(len(train_index), generator=generator).numpy()]
    return [np.sort(order[start : start + batch_size]) for start in range(0, len(order), batch_size)]


class Trainer:
    """One fold's fresh model, optimizer, schedule and loss; ``train_epoch`` makes one pass over batches.

    The loss is built first: its ``head`` attribute ("linear" when it has none) picks the
    model's classifier (LDAM's margins need cosine logits). Its ``set_epoch(epoch, total)``,
    when it has one, is called before every epoch.

    The loss of each step stays on the device: the host reads the losses every
    ``loss_read_steps`` steps (1 on CPU, where a read costs nothing; :data:`LOSS_READ_STEPS`
    on a GPU, where each read makes the CPU wait for the GPU to finish) and at the end of the
    epoch, and stops at the first non-finite one. Nothing else in a step reads a tensor back
    (fp16's GradScaler excepted: it checks for infinities every step).
    """

    def __init__(self, config: StudyConfig, class_counts: np.ndarray, loss_factory: LossFactory, *,
                 seed: int, device: torch.device, steps_per_epoch: int) -> None:
        t = self.training = config.training
        self.device, self.num_classes = device, len(class_counts)
        torch.manual_seed(seed)
        # Augmentation draws on the batch's device; its own seeded generator makes a fold re-runnable.
        self.augment_generator = torch.Generator(device=device).manual_seed(seed)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its algorithms once per shape
        # The loss draws no random numbers: building it first leaves the model's initialisation as it was.
        self.loss_fn = loss_factory(class_counts).to(device)
        head = getattr(self.loss_fn, "head", "linear")
        model = create_model(config.model.backbone, self.num_classes, pretrained=config.model.pretrained,
                             checkpoint=config.model.checkpoint, drop_rate=config.model.drop_rate,
                             head=head).to(device)
        if model_head(model) != head:  # a factory-level or monkeypatched model builder that ignored the head
            raise ValueError(f"the loss needs a {head} head, but the model has a {model_head(model)} one")
        # channels_last end to end on CUDA: the weights, and the augmented batches (augment writes that layout).
        self.memory_format = torch.channels_last if t.channels_last and device.type == "cuda" else torch.contiguous_format
        self.model = model.to(memory_format=self.memory_format) if self.memory_format == torch.channels_last else model
        self.train_model = torch.compile(self.model) if t.compile else self.model
        self.optimizer = _make_optimizer(self.model, t, device)
        self.scheduler = _make_scheduler(self.optimizer, t, steps_per_epoch)
        self.amp_dtype = _amp_dtype(t.amp, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        self.loss_read_steps = 1 if device.type == "cpu" else LOSS_READ_STEPS

    def train_epoch(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, fold: int = 0,
                    epoch: int = 0) -> EpochStats:
        """Train on each (uint8 images, labels) batch on the device, in order.

        Raises NonFiniteLossError naming the first step whose loss was NaN or infinite.
        """
        set_epoch = getattr(self.loss_fn, "set_epoch", None)  # plain nn.Module losses have none
        if set_epoch is not None:
            set_epoch(epoch, self.training.epochs)
        self.model.train()
        started = time.perf_counter()
        losses = _LossLog(fold, epoch)
        seen = 0
        for images, targets in batches:
            losses.add(self.step(images, targets))
            seen += len(targets)
            if losses.unread >= self.loss_read_steps:
                losses.read()
        total = losses.read()  # waits for the epoch's last step, so the time below is the device's too
        seconds = time.perf_counter() - started
        return EpochStats(fold, epoch, total / max(seen, 1), seconds, seen / max(seconds, 1e-9))

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One optimisation step on a uint8 (B, H, W, 3) batch; returns the loss, not read back."""
        t = self.training
        if t.augment:
            x = augment.train_transform(images, self.augment_generator, memory_format=self.memory_format)
        else:
            x = augment.eval_transform(images, memory_format=self.memory_format)
        with self._autocast():
            logits = self.train_model(x)
        loss = self.loss_fn(logits.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            _clip(self.model, t.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            _clip(self.model, t.grad_clip)
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss.detach()

    @torch.no_grad()
    def predict(self, reader: BatchReader, index: np.ndarray, batch_size: int) -> np.ndarray:
        """Predicted class per index, no augmentation; read back once, at the end."""
        self.model.eval()
        batches = [index[start : start + batch_size] for start in range(0, len(index), batch_size)]
        predictions = []
        for images, _ in reader.read(batches):
            with self._autocast():
                predictions.append(self.model(augment.eval_transform(images, memory_format=self.memory_format)).argmax(dim=1))
        return torch.cat(predictions).cpu().numpy() if predictions else np.empty(0, dtype=np.int64)

    def score(self, reader: BatchReader, index: np.ndarray, batch_size: int) -> ClassMetrics:
        return class_metrics(reader.dataset.labels[index], self.predict(reader, index, batch_size), self.num_classes)

    def _autocast(self) -> torch.autocast:
        dtype = self.amp_dtype or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp_dtype is not None)


class _LossLog:
    """An epoch's per-step losses: kept on the device until :meth:`read` fetches them in one transfer."""

    def __init__(self, fold: int, epoch: int) -> None:
        self.fold, self.epoch = fold, epoch
        self.total, self.steps = 0.0, 0
        self._unread: list[torch.Tensor] = []

    @property
    def unread(self) -> int:
        return len(self._unread)

    def add(self, loss: torch.Tensor) -> None:
        self._unread.append(loss)

    def read(self) -> float:
        """The running sum (summed on the host in step order); raises at the first non-finite loss."""
        if self._unread:
            values = torch.stack(self._unread).tolist()
            self._unread.clear()
            for value in values:
                if not math.isfinite(value):
                    raise NonFiniteLossError(f"loss became {value} in fold {self.fold}, epoch {self.epoch}, "
                                             f"step {self.steps}")
                self.total += value
                self.steps += 1
        return self.total


class BatchReader:
    """Batches of a dataset on the training device, in the order given, the next one read ahead.

    A background thread reads batch k + 1 from the (memory-mapped) cache while batch k trains;
    on CUDA it reads straight into pinned memory and copies on a side stream, so the copy
    overlaps the model's kernels as well. uint8 (B, H, W, 3) travels (4x less than float);
    augmentation runs on the device. The batches are exactly those of direct indexing.
    A context manager: leaving it ends the thread.
    """

    def __init__(self, dataset: ImageDataset, device: torch.device, *, pin_memory: bool | None = None) -> None:
        self.dataset, self.device = dataset, device
        self.pin_memory = device.type == "cuda" if pin_memory is None else pin_memory
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alpa-tune-reader")

    def __enter__(self) -> BatchReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def read(self, batches: Sequence[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) on the device for each index array, in order."""
        pending = self._pool.submit(self._load, batches[0]) if len(batches) else None
        for k in range(len(batches)):
            images, labels, copied = pending.result()
            if k + 1 < len(batches):
                pending = self._pool.submit(self._load, batches[k + 1])
            if copied is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(copied)  # the compute stream waits for the copy, the host does not
                images.record_stream(current)  # nor is their memory reused before that stream is done with them
                labels.record_stream(current)
            yield images, labels

    def _load(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
        source = self.dataset.images
        if len(index) and (index.min() < 0 or index.max() >= len(source)):
            raise IndexError(f"batch index out of range for {len(source)} images")
        # Gathered straight into the (pinned, on CUDA) buffer: one copy out of the page cache.
        # mode="clip" because numpy's default buffers the output for its bounds check (done above).
        images = torch.empty((len(index), *source.shape[1:]), dtype=torch.uint8, pin_memory=self.pin_memory)
        np.take(source, index, axis=0, out=images.numpy(), mode="clip")
        labels = torch.from_numpy(self.dataset.labels[index])
        if self._stream is None:
            return images.to(self.device), labels.to(self.device), None
        with torch.cuda.stream(self._stream):
            images = images.to(self.device, non_blocking=True)
            labels = (labels.pin_memory() if self.pin_memory else labels).to(self.device, non_blocking=True)
            return images, labels, self._stream.record_event()


def _make_optimizer(model: torch.nn.Module, t: TrainingConfig, device: torch.device) -> torch.optim.Optimizer:
    optimizer_class = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}.get(t.optimizer)
    if optimizer_class is None:
        raise ValueError(f"training.optimizer: no optimizer named {t.optimizer!r}")
    # CUDA: one fused kernel for all parameters; CPU keeps torch's default implementation.
    fused = True if device.type == "cuda" else None
    return optimizer_class(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=fused)


def _make_scheduler(optimizer: torch.optim.Optimizer, t: TrainingConfig, steps_per_epoch: int):
    if t.scheduler == "none":
        return None
    if t.scheduler != "cosine":
        raise ValueError(f"training.scheduler: no scheduler named {t.scheduler!r}")
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
    if mode in ("auto", "bf16"):
        return torch.bfloat16
    raise ValueError(f"training.amp: no mode named {mode!r}")


def _clip(model: torch.nn.Module, max_norm: float) -> None:
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
