"""``digits-lt``: scikit-learn's bundled handwritten digits made long-tailed (offline demo)."""

from __future__ import annotations

import hashlib

import numpy as np

from alpa_tune.config import DataConfig
from alpa_tune.data import register_source
from alpa_tune.data._longtail import check_room, long_tail_counts, resize_rgb
from alpa_tune.data._types import ImageDataset, ProgressFn


@register_source("digits-lt")
def load_digits_lt(cfg: DataConfig, progress: ProgressFn | None = None) -> ImageDataset:
    """Class c keeps n_max * ratio^(-c/9) images, chosen by a fixed seed: same data on every machine."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    num_classes = 10
    # n_max is the smallest class size so every class can supply its quota (174 -> rarest keeps 9 at ratio 20).
    n_max = int(np.bincount(labels).min())
    counts = long_tail_counts(n_max, num_classes, cfg.imbalance_ratio)
    rng = np.random.default_rng(0)
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in enumerate(counts)])
    keep.sort()
    check_room("digits-lt", len(keep), cfg.image_size, 2 * 8 * 8 * 8, "lower data.image_size")
    images = resize_rgb(digits.images[keep] / 16.0, cfg.image_size)
    if progress:
        progress(len(keep), len(keep))
    fingerprint = hashlib.sha256(f"digits-lt:{cfg.imbalance_ratio}:{cfg.image_size}".encode()).hexdigest()[:16]
    return ImageDataset(images, labels[keep], [str(c) for c in range(num_classes)], fingerprint)
