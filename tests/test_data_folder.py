"""folder source: a class-folder tree (nested, with stray files and a symlinked class)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alpa_tune.config import DataConfig
from alpa_tune.data import DataError, load_dataset


def write_tree(root: Path, counts: dict[str, int], ext: str = ".png") -> None:
    for c, (name, n) in enumerate(counts.items()):
        # Nested as the bone-marrow release ships them (ABE/0001-1000/ABE_00001.jpg).
        folder = root / name / "0001-1000"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (24, 24), (40 * c, 10 * i, 200)).save(folder / f"{name}_{i:05d}{ext}")


def cfg(root: Path, tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(source="folder", path=str(root), image_size=12, cache_dir=str(tmp_path / "cache"), **kw)


def test_classes_are_sorted_subfolders_and_stray_files_are_ignored(tmp_path: Path) -> None:
    root = tmp_path / "bm"
    write_tree(root, {"NGS": 3, "BAS": 2, "EBO": 4})
    (root / "BAS" / "Thumbs.db").write_bytes(b"\0")
    (root / "BAS" / ".DS_Store").write_bytes(b"\0")
    (root / ".hidden").mkdir()
    (root / "README.txt").write_text("not a class")
    Image.new("RGB", (24, 24)).save(root / "EBO" / "0001-1000" / "UPPER.JPG")
    data = load_dataset(cfg(root, tmp_path))
    assert data.class_names == ["BAS", "EBO", "NGS"]
    np.testing.assert_array_equal(data.class_counts(), [2, 5, 3])
    np.testing.assert_array_equal(data.labels, [0, 0, 1, 1, 1, 1, 1, 2, 2, 2])
    assert data.images.shape == (10, 12, 12, 3)
    assert tuple(data.images[-1, 6, 6]) == (0, 20, 200)  # NGS_00002: written first (c=0), image 2


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    write_tree(tmp_path / "bm", {"A": 1, "B": 1})
    Image.fromarray(np.full((24, 24), 32896, dtype=np.uint16)).save(tmp_path / "bm" / "A" / "wide.png")
    data = load_dataset(cfg(tmp_path / "bm", tmp_path))
    assert tuple(data.images[1, 6, 6]) == (128, 128, 128)  # 32896 / 257, not clipped to 255


def test_symlinked_class_folders_select_a_subset(tmp_path: Path) -> None:
    full = tmp_path / "full"
    write_tree(full, {"A": 2, "B": 2, "C": 2})
    subset = tmp_path / "subset"
    subset.mkdir()
    for name in ("A", "C"):
        os.symlink(full / name, subset / name)
    data = load_dataset(cfg(subset, tmp_path))
    assert data.class_names == ["A", "C"] and len(data.labels) == 4


def error(root: Path, tmp_path: Path) -> str:
    with pytest.raises(DataError) as info:
        load_dataset(cfg(root, tmp_path))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    assert "is not a folder" in error(tmp_path / "missing", tmp_path)
    (tmp_path / "empty").mkdir()
    assert "has no class subfolders" in error(tmp_path / "empty", tmp_path)
    write_tree(tmp_path / "one", {"A": 2})
    assert "only one class subfolder" in error(tmp_path / "one", tmp_path)
    write_tree(tmp_path / "hollow", {"A": 2, "B": 1})
    (tmp_path / "hollow" / "C").mkdir()
    (tmp_path / "hollow" / "C" / "notes.txt").write_text("no images")
    message = error(tmp_path / "hollow", tmp_path)
    assert str(tmp_path / "hollow" / "C") in message and "no image files" in message


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    root = tmp_path / "bm"
    write_tree(root, {"A": 3, "B": 3}, ext=".jpg")
    bad = root / "B" / "0001-1000" / "B_00001.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    message = error(root, tmp_path)
    assert str(bad) in message and "not a readable image" in message
