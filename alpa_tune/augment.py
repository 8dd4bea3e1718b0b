"""Batch augmentation on tensors, on the training device: no per-image PIL work."""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return batch.permute(0, 3, 1, 2).float().div_(255)


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def eval_transform(batch: torch.Tensor) -> torch.Tensor:
    """Validation: scale and normalise only."""
    return normalize(to_float(batch))


def train_transform(batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training: random horizontal flip, then normalise."""
    images = to_float(batch)
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    return normalize(images)
