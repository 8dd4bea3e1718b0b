"""Batch augmentation on tensors, on the training device: no per-image PIL work.

The paper's recipe (after its references [1, 7]) as torchvision would apply it per image --
RandomHorizontalFlip, RandomRotation(15), RandomAdjustSharpness(2), Normalize (ImageNet),
RandomErasing -- but drawn per sample and applied to the whole batch at once, so it runs on
the GPU beside the model: flip and rotation are one ``affine_grid``/``grid_sample``, sharpness
is a 3x3 box-sum blend per sample, erasing is a per-sample box mask.
Every random draw goes through ``generator`` (on the batch's device): same seed, same batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1], contiguous (NCHW)."""
    return batch.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format).mul_(1 / 255)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation (a new tensor)."""
    return _normalize_(images.clone())


def _normalize_(images: torch.Tensor) -> torch.Tensor:
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return images.sub_(mean).div_(std)


def eval_transform(batch: torch.Tensor) -> torch.Tensor:
    """Validation: scale and normalise only."""
    return _normalize_(to_float(batch))


def train_transform(
    batch: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    flip_p: float = 0.5,
    max_rotation: float = 15.0,
    sharpness: float = 2.0,
    sharpness_p: float = 0.5,
    erase_p: float = 0.5,
    erase_scale: tuple[float, float] = (0.02, 0.33),
    erase_ratio: tuple[float, float] = (0.3, 3.3),
) -> torch.Tensor:
    """Training: uint8 (B, H, W, 3) -> augmented, normalised float (B, 3, H, W).

    Defaults are torchvision's for each transform; rotation is always applied, uniformly in
    +-max_rotation degrees, with black fill (as RandomRotation). ``generator`` must live on
    ``batch.device``. Intermediate results are updated in place: on CPU, fresh multi-MB
    tensors per step cost more in page faults than the arithmetic itself.
    """
    images = to_float(batch)
    if images.shape[0] == 0:
        return _normalize_(images)
    images = flip_and_rotate(images, generator, flip_p=flip_p, max_rotation=max_rotation)
    if sharpness_p > 0:
        _sharpen_(images, generator, factor=sharpness, p=sharpness_p)
    _normalize_(images)
    if erase_p > 0:
        _erase_(images, generator, p=erase_p, scale=erase_scale, ratio=erase_ratio)
    return images


def _uniform(n: int, low: float, high: float, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, device=like.device, generator=generator, dtype=like.dtype) * (high - low) + low


def flip_and_rotate(images: torch.Tensor, generator: torch.Generator | None = None, *,
                    flip_p: float = 0.5, max_rotation: float = 15.0) -> torch.Tensor:
    """Per-sample horizontal flip and rotation in one resampling pass (bilinear, zero fill)."""
    n = images.shape[0]
    flip = _uniform(n, 0, 1, images, generator) < flip_p
    angle = _uniform(n, -max_rotation, max_rotation, images, generator) * (math.pi / 180)
    if max_rotation == 0:
        # Pure flips need no interpolation: exact pixels, and cheaper.
        return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx = torch.where(flip, -1.0, 1.0).to(images.dtype)
    h, w = images.shape[-2:]
    # Output pixel centres in [-1, 1] (align_corners=False); the factors h/w and w/h make the
    # rotation rigid in pixel units when the image is not square.
    xs = (torch.arange(w, device=images.device, dtype=images.dtype) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=images.device, dtype=images.dtype) * 2 + 1) / h - 1
    # Input coords = mirror_x(rotate(output coords)): an x part (B, 1, W, 2) plus a y part
    # (B, H, 1, 2) broadcast into the grid, one allocation; F.affine_grid's batched matmul is
    # ~10x slower on CPU for the same grid.
    x_part = torch.stack((cos * sx, sin * (w / h)), dim=-1).view(n, 1, 1, 2) * xs.view(1, 1, w, 1)
    y_part = torch.stack((-sin * sx * (h / w), cos), dim=-1).view(n, 1, 1, 2) * ys.view(1, h, 1, 1)
    grid = x_part + y_part
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _sharpen_(images: torch.Tensor, generator: torch.Generator | None = None, *,
              factor: float = 2.0, p: float = 0.5) -> torch.Tensor:
    """torchvision's adjust_sharpness, in place, on the samples drawn with probability p.

    The smoothing kernel [[1,1,1],[1,5,1],[1,1,1]]/13 is a 3x3 box sum plus 4x the centre, so
    blend(img, smooth, factor) = img + (1 - factor) * (box - 9 img) / 13 on the interior (the
    border keeps its pixels, as in torchvision): four shifted adds, no convolution, which is
    fast in any memory layout.
    """
    n, _, h, w = images.shape
    apply = _uniform(n, 0, 1, images, generator) < p
    if h < 3 or w < 3 or factor == 1.0:
        return images
    coef = (1.0 - factor) / 13.0
    if images.device.type == "cpu":
        # Work only on the chosen samples (half the arithmetic); nonzero() would stall a GPU.
        index = apply.nonzero().squeeze(1)
        if len(index):
            images.index_copy_(0, index, _sharpen_all_(images.index_select(0, index), coef))
        return images
    return _sharpen_all_(images, torch.where(apply, coef, 0.0).to(images.dtype).view(-1, 1, 1, 1))


def _sharpen_all_(images: torch.Tensor, coef: float | torch.Tensor) -> torch.Tensor:
    rows = images[..., :-2, :] + images[..., 1:-1, :]
    rows += images[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1]
    box += rows[..., 2:]
    del rows
    inner = images[..., 1:-1, 1:-1]
    inner.add_(box.sub_(inner, alpha=9).mul_(coef))
    return images.clamp_(0, 1)


def _erase_(images: torch.Tensor, generator: torch.Generator | None = None, *, p: float = 0.5,
            scale: tuple[float, float] = (0.02, 0.33), ratio: tuple[float, float] = (0.3, 3.3),
            value: float = 0.0) -> torch.Tensor:
    """In place: per-sample random rectangle set to ``value`` (0 = the mean colour once normalised).

    torchvision retries up to 10 draws until the box fits; here a box that would not fit is
    clipped to the image instead, which keeps everything one vectorised draw.
    """
    n, _, h, w = images.shape
    apply = _uniform(n, 0, 1, images, generator) < p
    area = _uniform(n, scale[0], scale[1], images, generator) * (h * w)
    aspect = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), images, generator))
    eh = torch.sqrt(area * aspect).round().clamp(1, h)
    ew = torch.sqrt(area / aspect).round().clamp(1, w)
    top = (_uniform(n, 0, 1, images, generator) * (h - eh + 1)).floor()
    left = (_uniform(n, 0, 1, images, generator) * (w - ew + 1)).floor()
    rows = torch.arange(h, device=images.device, dtype=images.dtype).view(1, h, 1)
    cols = torch.arange(w, device=images.device, dtype=images.dtype).view(1, 1, w)
    col = lambda t: t.view(-1, 1, 1)  # noqa: E731
    in_rows = (rows >= col(top)) & (rows < col(top + eh)) & col(apply)
    in_cols = (cols >= col(left)) & (cols < col(left + ew))
    keep = ~(in_rows & in_cols).unsqueeze(1)  # (B, 1, H, W), False inside the box
    images.mul_(keep)
    if value:
        images.add_(~keep * value)
    return images
