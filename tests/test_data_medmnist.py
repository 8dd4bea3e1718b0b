"""medmnist source: MedMNIST-shaped .npz files, pooled and official splits, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from alpa_tune.config import DataConfig
from alpa_tune.data import DataError, load_dataset

SPLIT_SIZES = {"train": 14, "val": 4, "test": 6}


def write_npz(path: Path, *, size: int = 28, rgb: bool = True, classes: int = 7, **override: np.ndarray) -> dict:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in SPLIT_SIZES.items():
        shape = (n, size, size, 3) if rgb else (n, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        # Every class in every split (labels (N, 1) int, as MedMNIST ships them).
        arrays[f"{split}_labels"] = (np.arange(n) % classes).reshape(n, 1).astype(np.uint8)
    arrays.update(override)
    np.savez(path, **arrays)
    return arrays


def cfg(path: Path, tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(source="medmnist", path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def test_pooled_rgb_at_native_size_keeps_pixels(tmp_path: Path) -> None:
    arrays = write_npz(tmp_path / "dermamnist.npz")
    calls = []
    data = load_dataset(cfg(tmp_path / "dermamnist.npz", tmp_path, image_size=28), lambda d, t: calls.append((d, t)))
    assert data.images.shape == (24, 28, 28, 3) and data.images.dtype == np.uint8
    expected = np.concatenate([arrays[f"{s}_images"] for s in SPLIT_SIZES])
    np.testing.assert_array_equal(np.asarray(data.images), expected)
    np.testing.assert_array_equal(data.labels, np.concatenate([arrays[f"{s}_labels"][:, 0] for s in SPLIT_SIZES]))
    assert data.labels.dtype == np.int64
    assert data.class_names == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert data.holdout_index is None
    assert calls[-1] == (24, 24)


def test_grayscale_is_resized_and_made_rgb(tmp_path: Path) -> None:
    write_npz(tmp_path / "pneumoniamnist_64.npz", size=28, rgb=False, classes=2)
    data = load_dataset(cfg(tmp_path / "pneumoniamnist_64.npz", tmp_path, image_size=40))
    assert data.images.shape == (24, 40, 40, 3)
    assert np.array_equal(data.images[..., 0], data.images[..., 2])
    assert data.class_names == ["normal", "pneumonia"]


def test_official_splits_hold_out_the_test_split(tmp_path: Path) -> None:
    write_npz(tmp_path / "bloodmnist.npz", classes=8)
    data = load_dataset(cfg(tmp_path / "bloodmnist.npz", tmp_path, image_size=28, official_splits=True))
    np.testing.assert_array_equal(data.holdout_index, np.arange(18, 24))
    assert data.num_classes == 8
    pooled = load_dataset(cfg(tmp_path / "bloodmnist.npz", tmp_path, image_size=28))
    assert pooled.holdout_index is None and pooled.fingerprint != data.fingerprint


def test_unknown_file_name_gets_generic_class_names(tmp_path: Path) -> None:
    write_npz(tmp_path / "mystuff.npz", classes=3)
    data = load_dataset(cfg(tmp_path / "mystuff.npz", tmp_path, image_size=28))
    assert data.class_names == ["class_0", "class_1", "class_2"]


def test_single_channel_axis_and_flat_labels_are_accepted(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    extra = {f"{s}_images": rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8) for s, n in SPLIT_SIZES.items()}
    extra |= {f"{s}_labels": np.arange(n) % 2 for s, n in SPLIT_SIZES.items()}
    write_npz(tmp_path / "x.npz", **extra)
    data = load_dataset(cfg(tmp_path / "x.npz", tmp_path, image_size=28))
    assert data.images.shape == (24, 28, 28, 3) and data.num_classes == 2


def _error(tmp_path: Path, name: str = "dermamnist.npz", **override: np.ndarray) -> str:
    write_npz(tmp_path / name, **override)
    with pytest.raises(DataError) as info:
        load_dataset(cfg(tmp_path / name, tmp_path, image_size=28))
    message = str(info.value)
    assert "\n" not in message and name in message
    return message


def test_label_out_of_range_for_known_classes(tmp_path: Path) -> None:
    assert "label 7 is out of range for 7 classes" in _error(tmp_path, test_labels=np.full((6, 1), 7))


def test_negative_and_fractional_labels(tmp_path: Path) -> None:
    assert "negative label" in _error(tmp_path, val_labels=np.array([[0], [1], [-1], [2]]))
    assert "must be integers" in _error(tmp_path, val_labels=np.array([[0.0], [1.5], [1.0], [2.0]]))


def test_multilabel_and_count_mismatch(tmp_path: Path) -> None:
    assert "multi-label" in _error(tmp_path, train_labels=np.zeros((14, 3), dtype=np.int64))
    assert "4 labels for 6 images" in _error(tmp_path, test_labels=np.zeros((4, 1), dtype=np.int64))


def test_missing_key_and_wrong_dtype(tmp_path: Path) -> None:
    np.savez(tmp_path / "partial.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match="missing key.*train_labels"):
        load_dataset(cfg(tmp_path / "partial.npz", tmp_path, image_size=28))
    assert "must be uint8" in _error(tmp_path, val_images=np.zeros((4, 28, 28), dtype=np.float32))


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(cfg(tmp_path / "nope.npz", tmp_path, image_size=28))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match=r"junk\.npz: not a readable \.npz"):
        load_dataset(cfg(tmp_path / "junk.npz", tmp_path, image_size=28))
    with pytest.raises(DataError, match="data.path"):
        load_dataset(DataConfig(source="medmnist", cache_dir=str(tmp_path)))
