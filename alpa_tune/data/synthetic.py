"""``synthetic``: a generated long-tailed image set that is learnable, for tests and smoke runs."""

from __future__ import annotations

import hashlib

import numpy as np

from alpa_tune.config import DataConfig
from alpa_tune.data import register_source
from alpa_tune.data._longtail import check_room, long_tail_counts, resize_rgb
from alpa_tune.data._types import ImageDataset, ProgressFn


@register_source("synthetic")
def load_synthetic(cfg: DataConfig, progress: ProgressFn | None = None) -> ImageDataset:
    """Class c is a bright square at a class-specific place on noise; counts decay to the ratio."""
    num_classes = cfg.num_classes
    n_max = cfg.samples_per_class
    if cfg.num_samples is not None:
        # Scale n_max so the long-tailed counts add up to about num_samples.
        weights = sum(cfg.imbalance_ratio ** (-c / (num_classes - 1)) for c in range(num_classes))
        n_max = max(1, round(cfg.num_samples / weights))
    counts = long_tail_counts(n_max, num_classes, cfg.imbalance_ratio)
    count_key = "data.num_samples" if cfg.num_samples is not None else "data.samples_per_class"
    check_room("synthetic", sum(counts), cfg.image_size, 2 * 16 * 16 * 8, f"lower data.image_size or {count_key}")
    rng = np.random.default_rng(1234)
    grid = int(np.ceil(np.sqrt(num_classes)))
    base = 16
    cell = base // grid
    images, labels = [], []
    for c, n in enumerate(counts):
        canvas = rng.uniform(0.0, 0.35, size=(n, base, base))
        row, col = divmod(c, grid)
        canvas[:, row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] += 0.6
        images.append(canvas)
        labels.append(np.full(n, c, dtype=np.int64))
    gray = np.clip(np.concatenate(images), 0, 1)
    if progress:
        progress(len(gray), len(gray))
    key = f"synthetic:{num_classes}:{n_max}:{cfg.imbalance_ratio}:{cfg.image_size}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    return ImageDataset(resize_rgb(gray, cfg.image_size), np.concatenate(labels), [f"class_{c}" for c in range(num_classes)], fingerprint)
