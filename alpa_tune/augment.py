"""Batch augmentation on tensors, on the training device: no per-image PIL work.

The paper's recipe (after its references [1, 7]) as torchvision would apply it per image --
RandomHorizontalFlip, RandomRotation(15), RandomAdjustSharpness(2), Normalize (ImageNet),
RandomErasing -- but drawn per sample and applied to the whole batch at once, so it runs on
the GPU beside the model: flip and rotation are one ``grid_sample`` over a per-sample affine
grid, sharpness is a 3x3 box-sum blend, erasing a per-sample box. Every random draw goes
through ``generator`` (on the batch's device): same seed, same batch.

On CPU the cost is dominated by memory traffic, so intermediates are updated in place, and a
CPU process should call :func:`reuse_cpu_memory` once (glibc otherwise returns each freed
batch to the OS and pages it back in on the next).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def reuse_cpu_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Keep freed multi-MB blocks in this process for reuse (glibc malloc); True if applied.

    By default glibc hands every large block back to the OS when it is freed, so each fresh
    batch-sized CPU tensor is paged in again: ~1,500 page faults per 6 MB, which on CPU costs
    as much as the augmentation arithmetic. Call once at the start of a CPU worker or loader
    process (settings are inherited by forked children). A no-op (False) off glibc.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(mallopt(m_trim_threshold, trim_threshold))


def to_float(batch: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1], in ``memory_format``.

    NCHW by default; channels_last costs nothing extra (the permuted uint8 batch already has
    that layout).
    """
    return batch.permute(0, 3, 1, 2).to(torch.float32, memory_format=memory_format).mul_(1 / 255)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation (a new tensor)."""
    return _normalize_(images.clone())


def _normalize_(images: torch.Tensor, peak: float = 1.0,
                memory_format: torch.memory_format | None = None) -> torch.Tensor:
    """For images in [0, peak]: (x / peak - mean) / std as one multiply and one add, in place.

    If ``memory_format`` asks for another layout, the multiply writes a new tensor in that
    layout instead: the conversion rides on a pass made anyway, and the values are the same.
    """
    scale, shift = _normalize_constants(images.device, images.dtype, peak)
    if memory_format is not None and not images.is_contiguous(memory_format=memory_format):
        out = torch.empty_like(images, memory_format=memory_format)
        return torch.mul(images, scale, out=out).add_(shift)
    return images.mul_(scale).add_(shift)


@functools.lru_cache(maxsize=16)
def _normalize_constants(device: torch.device, dtype: torch.dtype, peak: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / (peak * std), -mean / std), built once per device: a tensor made from a Python list
    is a host-to-device copy that waits for the GPU to finish its queued work."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=dtype, device=device).view(1, 3, 1, 1)
    return 1 / (peak * std), -mean / std


def eval_transform(batch: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Validation: scale and normalise only; the result in ``memory_format`` (channels_last for such a model)."""
    return _normalize_(to_float(batch, memory_format))


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
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """Training: uint8 (B, H, W, 3) -> augmented, normalised float (B, 3, H, W) in ``memory_format``.

    Defaults are torchvision's for each transform; rotation is always applied, uniformly in
    +-max_rotation degrees, with black fill (as RandomRotation). ``generator`` must live on
    ``batch.device``. The values do not depend on ``memory_format``.
    """
    if batch.shape[0] == 0:
        return eval_transform(batch, memory_format)
    # Values stay in [0, 255] until normalisation (every step before it is linear or clamps),
    # which saves a pass over the batch. NCHW until then: what grid_sample reads fastest (and
    # writes anyway); normalisation writes the layout asked for.
    images = batch.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    images = flip_and_rotate(images, generator, flip_p=flip_p, max_rotation=max_rotation)
    if sharpness_p > 0:
        _sharpen_(images, generator, factor=sharpness, p=sharpness_p, peak=255.0)
    images = _normalize_(images, peak=255.0, memory_format=memory_format)
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
    # Input coords = mirror_x(rotate(output coords)):
    #   grid[b, i, j, k] = P[b, k] * xs[j] + Q[b, k] * ys[i]   (k = 0: x, 1: y)
    # built as one broadcast multiply-add over rows of 2W interleaved values, so the inner loop
    # runs over 2W contiguous floats (F.affine_grid's batched matmul is several times slower on CPU).
    p = torch.stack((cos * sx, sin * (w / h)), dim=-1)  # (B, 2)
    q = torch.stack((-sin * sx * (h / w), cos), dim=-1)  # (B, 2)
    x_terms = (p.view(n, 1, 2) * xs.view(1, w, 1)).view(n, 1, 2 * w)
    grid = torch.addcmul(x_terms, ys.view(1, h, 1), q.repeat(1, w).view(n, 1, 2 * w)).view(n, h, w, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _sharpen_(images: torch.Tensor, generator: torch.Generator | None = None, *,
              factor: float = 2.0, p: float = 0.5, subset: bool | None = None, peak: float = 1.0) -> torch.Tensor:
    """torchvision's adjust_sharpness, in place, on the samples drawn with probability p (images in [0, peak]).

    The smoothing kernel [[1,1,1],[1,5,1],[1,1,1]]/13 is a 3x3 box sum plus 4x the centre, so
    blend(img, smooth, factor) = img + (1 - factor) * (box - 9 img) / 13 on the interior (the
    border keeps its pixels, as in torchvision): four shifted adds, no convolution, which is
    fast in any memory layout. ``subset`` (default: on CPU) computes only the chosen samples.
    """
    n, _, h, w = images.shape
    apply = _uniform(n, 0, 1, images, generator) < p
    if h < 3 or w < 3 or factor == 1.0:
        return images
    coef = (1.0 - factor) / 13.0
    if subset if subset is not None else images.device.type == "cpu":
        # Work only on the chosen samples (half the arithmetic); nonzero() would stall a GPU.
        index = apply.nonzero().squeeze(1)
        if len(index):
            images.index_copy_(0, index, _sharpen_all_(images.index_select(0, index), coef, peak))
        return images
    return _sharpen_all_(images, torch.where(apply, coef, 0.0).to(images.dtype).view(-1, 1, 1, 1), peak)


def _sharpen_all_(images: torch.Tensor, coef: float | torch.Tensor, peak: float) -> torch.Tensor:
    rows = images[..., :-2, :] + images[..., 1:-1, :]
    rows += images[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1]
    box += rows[..., 2:]
    del rows
    # inner + coef * (box - 9 inner) = inner * (1 - 9 coef) + coef * box
    inner = images[..., 1:-1, 1:-1]
    inner.mul_(1 - 9 * coef)
    inner.add_(box, alpha=coef) if isinstance(coef, float) else inner.addcmul_(box, coef)
    return images.clamp_(0, peak)


def _erase_(images: torch.Tensor, generator: torch.Generator | None = None, *, p: float = 0.5,
            scale: tuple[float, float] = (0.02, 0.33), ratio: tuple[float, float] = (0.3, 3.3),
            value: float = 0.0, per_sample: bool | None = None) -> torch.Tensor:
    """In place: per-sample random rectangle set to ``value`` (0 = the mean colour once normalised).

    torchvision retries up to 10 draws until the box fits; here a box that would not fit is
    clipped to the image instead, which keeps everything one vectorised draw. ``per_sample``
    (default: on CPU) fills each box by slicing; otherwise one mask covers the batch.
    """
    n, _, h, w = images.shape
    apply = _uniform(n, 0, 1, images, generator) < p
    area = _uniform(n, scale[0], scale[1], images, generator) * (h * w)
    aspect = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), images, generator))
    eh = torch.sqrt(area * aspect).round().clamp(1, h)
    ew = torch.sqrt(area / aspect).round().clamp(1, w)
    top = (_uniform(n, 0, 1, images, generator) * (h - eh + 1)).floor()
    left = (_uniform(n, 0, 1, images, generator) * (w - ew + 1)).floor()
    if per_sample if per_sample is not None else images.device.type == "cpu":
        # A slice assignment per chosen sample: far less memory traffic than a full-batch mask
        # (reading the boxes back with tolist() would stall a GPU, hence the mask path below).
        boxes = torch.stack((top, top + eh, left, left + ew), dim=1).int()[apply].tolist()
        for i, (y0, y1, x0, x1) in zip(apply.nonzero().squeeze(1).tolist(), boxes, strict=True):
            images[i, :, y0:y1, x0:x1] = value
        return images
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
