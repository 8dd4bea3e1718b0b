"""Batch augmentation: shapes, determinism, each transform against its definition."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.functional as TF

from alpa_tune import augment
from alpa_tune.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

OFF = {"flip_p": 0.0, "max_rotation": 0.0, "sharpness_p": 0.0, "erase_p": 0.0}


def batch(n: int = 8, h: int = 24, w: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def unnormalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return images * std + mean


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_eval_is_scaling_and_imagenet_normalisation_only() -> None:
    x = batch()
    expected = TF.normalize(x.permute(0, 3, 1, 2).float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    out = eval_transform(x)
    assert out.shape == (8, 3, 24, 24) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(train_transform(x, gen(), **OFF), expected)
    torch.testing.assert_close(augment.normalize(augment.to_float(x)), expected)


def test_same_generator_same_batch_and_different_seeds_differ() -> None:
    x = batch(16)
    a, b = train_transform(x, gen(3)), train_transform(x, gen(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, train_transform(x, gen(4)))
    assert a.shape == (16, 3, 24, 24) and torch.isfinite(a).all()


def test_flip_is_an_exact_mirror() -> None:
    x = batch()
    out = train_transform(x, gen(), **{**OFF, "flip_p": 1.0})
    torch.testing.assert_close(out, eval_transform(x).flip(-1))


def test_tiny_rotation_is_identity_and_flip_through_the_grid_is_exact() -> None:
    x = batch(4, 16, 20)  # non-square on purpose
    near_zero = {**OFF, "max_rotation": 1e-4}
    torch.testing.assert_close(train_transform(x, gen(), **near_zero), eval_transform(x), atol=1e-3, rtol=0)
    flipped = train_transform(x, gen(), **{**near_zero, "flip_p": 1.0})
    torch.testing.assert_close(flipped, eval_transform(x).flip(-1), atol=1e-3, rtol=0)


def test_rotation_moves_pixels_by_at_most_its_angle_and_fills_black() -> None:
    # A single bright pixel off-centre: after rotating by <= 15 degrees its mass stays on the
    # circle of the same radius, within the arc the angle allows.
    n, size = 32, 33
    x = torch.zeros(n, size, size, 3, dtype=torch.uint8)
    x[:, 16, 28] = 255  # radius 12 to the right of the centre pixel (16, 16)
    out = unnormalize(train_transform(x, gen(), **{**OFF, "max_rotation": 15.0}))[:, 0]
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    weight = out / out.sum(dim=(1, 2), keepdim=True)
    cy, cx = (weight * ys).sum(dim=(1, 2)), (weight * xs).sum(dim=(1, 2))
    angles = torch.rad2deg(torch.atan2(cy - 16, cx - 16)).abs()
    assert angles.max() <= 15.5 and angles.std() > 2  # bounded, and really random per sample
    assert torch.allclose(torch.hypot(cy - 16, cx - 16), torch.tensor(12.0), atol=0.6)
    # Corners rotate out of the image: filled with black (0 before normalisation), as torchvision.
    white = torch.full((n, size, size, 3), 255, dtype=torch.uint8)
    corners = unnormalize(train_transform(white, gen(), **{**OFF, "max_rotation": 15.0}))[:, :, 0, 0]
    assert (corners < 0.5).float().mean() > 0.8


def test_sharpness_matches_torchvision() -> None:
    x = batch(6, 20, 17)
    out = unnormalize(train_transform(x, gen(), **{**OFF, "sharpness_p": 1.0, "sharpness": 2.0}))
    expected = TF.adjust_sharpness(x.permute(0, 3, 1, 2).float() / 255, 2.0)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=0)


def test_gpu_code_paths_equal_the_cpu_ones() -> None:
    # On a GPU, sharpening runs on the whole batch with a per-sample coefficient and erasing
    # uses one batch mask (no host sync); on CPU they touch only the chosen samples. Same result.
    images = augment.to_float(batch(10))
    for seed in range(3):
        subset = augment._sharpen_(images.clone(), gen(seed), factor=2.0, p=0.5, subset=True)
        whole = augment._sharpen_(images.clone(), gen(seed), factor=2.0, p=0.5, subset=False)
        torch.testing.assert_close(subset, whole)
        assert not torch.equal(subset, images)
        sliced = augment._erase_(images.clone(), gen(seed), p=0.5, value=0.25, per_sample=True)
        masked = augment._erase_(images.clone(), gen(seed), p=0.5, value=0.25, per_sample=False)
        assert torch.equal(sliced, masked) and not torch.equal(sliced, images)


def test_channels_last_output_has_the_same_values() -> None:
    # A channels_last model gets its batches in that layout (no conversion in its first layer).
    x = batch(6, 20, 17)
    cl = torch.channels_last
    for seed in range(2):
        out = train_transform(x, gen(seed), memory_format=cl)
        assert out.is_contiguous(memory_format=cl) and not out.is_contiguous()
        assert torch.equal(out, train_transform(x, gen(seed)))
    assert torch.equal(train_transform(x, gen(), **OFF, memory_format=cl), train_transform(x, gen(), **OFF))
    out = eval_transform(x, memory_format=cl)
    assert out.is_contiguous(memory_format=cl) and torch.equal(out, eval_transform(x))
    assert train_transform(batch(0), gen(), memory_format=cl).shape == (0, 3, 24, 24)
    # The GPU's one-mask erasing works on that layout too.
    images = augment.to_float(x)
    masked = augment._erase_(images.contiguous(memory_format=cl), gen(1), p=1.0, per_sample=False)
    assert masked.is_contiguous(memory_format=cl)
    assert torch.equal(masked, augment._erase_(images.clone(), gen(1), p=1.0, per_sample=True))


def test_erasing_cuts_one_box_per_sample() -> None:
    x = torch.full((64, 32, 32, 3), 200, dtype=torch.uint8)
    out = train_transform(x, gen(), **{**OFF, "erase_p": 1.0})
    erased = (out == 0).all(dim=1)  # value 0 after normalisation, all three channels
    fractions = erased.float().mean(dim=(1, 2))
    assert (fractions > 0).all() and fractions.max() <= 0.34
    for box in erased:
        rows, cols = box.any(dim=1).nonzero(), box.any(dim=0).nonzero()
        # A rectangle: its bounding box is exactly the erased set.
        assert box.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    none = train_transform(x, gen(), **OFF)
    assert not (none == 0).all(dim=1).any()


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_batches(n: int) -> None:
    out = train_transform(batch(n), gen())
    assert out.shape == (n, 3, 24, 24)


def test_default_recipe_changes_images_but_keeps_statistics_sane() -> None:
    x = batch(64, 32, 32)
    out = train_transform(x, gen())
    assert not torch.allclose(out, eval_transform(x))
    assert torch.isfinite(out).all()
    assert math.isclose(float(out.mean()), float(eval_transform(x).mean()), abs_tol=0.5)


def test_reuse_cpu_memory_is_safe_to_call() -> None:
    import sys

    applied = augment.reuse_cpu_memory()
    assert isinstance(applied, bool)
    if sys.platform.startswith("linux") and "glibc" in " ".join(__import__("platform").libc_ver()):
        assert applied
    out = train_transform(batch(4), gen())  # still works afterwards
    assert torch.isfinite(out).all()
