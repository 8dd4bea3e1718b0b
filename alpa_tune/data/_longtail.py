"""Shared helpers for the generated long-tailed sources (digits-lt, synthetic)."""

from __future__ import annotations

import numpy as np

from alpa_tune.data._limits import check_memory

# Peak bytes per output pixel while resize_rgb runs: float32 result and its clamped/scaled
# copies, then the uint8 gray, RGB and contiguous arrays.
_RESIZE_BYTES_PER_PIXEL = 12


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """n_c = n_max * ratio^(-c / (C - 1)): exponential decay from n_max to n_max / ratio."""
    return [max(1, round(n_max * imbalance_ratio ** (-c / (num_classes - 1)))) for c in range(num_classes)]


def resize_rgb(gray: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w) floats in [0, 1] -> uint8 (N, size, size, 3), bilinear."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(gray.astype(np.float32))[:, None]
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    rgb = (resized.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    return rgb.permute(0, 2, 3, 1).contiguous().numpy()


def check_room(source: str, count: int, size: int, source_bytes: int, hint: str) -> None:
    """Refuse, before generating anything, a set that cannot be held in this machine's memory."""
    need = count * (size * size * _RESIZE_BYTES_PER_PIXEL + source_bytes)
    check_memory(need, f"{count:,} {source} images of {size} x {size} px (held in memory)", hint)
