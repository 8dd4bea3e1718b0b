"""The in-memory form every dataset source produces."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from alpa_tune.errors import BadInput

# progress(done, total): called while a source decodes or builds its cache.
ProgressFn = Callable[[int, int], None]


class DataError(BadInput):
    """Bad input data: the message names the file (or key) and the problem in one line."""


@dataclass
class ImageDataset:
    """Decoded images, resized once: uint8 (N, H, W, 3), possibly a read-only memmap."""

    images: np.ndarray
    labels: np.ndarray  # int64 (N,), values in [0, num_classes)
    class_names: list[str]
    fingerprint: str  # identifies the source files and the image size
    # Official splits (medmnist with data.official_splits): indices forced into the hold-out.
    holdout_index: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise DataError(f"images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)
