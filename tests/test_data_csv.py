"""csv source: an APTOS2019-shaped CSV with PNGs written by PIL, and every bad-data case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alpa_tune.config import DataConfig
from alpa_tune.data import DataError, load_dataset

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def write_aptos(root: Path, labels: list[int], *, ext: str = ".png", folder: str = "train_images",
                header: str = "id_code,diagnosis") -> Path:
    """train.csv + train_images/<id>.png: non-square solid images coloured by class."""
    images = root / folder
    images.mkdir(parents=True, exist_ok=True)
    rows = [header]
    for i, label in enumerate(labels):
        ident = f"{i:04x}beef"
        size = (30 + 3 * i, 20 + i)  # non-square and varied, as fundus photographs are
        Image.new("RGB", size, COLOURS[label % len(COLOURS)]).save(images / f"{ident}{ext}")
        rows.append(f"{ident},{label}")
    table = root / "train.csv"
    table.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return table


def cfg(table: Path, tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(source="csv", path=str(table), image_size=16, cache_dir=str(tmp_path / "cache"), **kw)


LABELS = [0, 1, 2, 3, 4, 0, 0, 1, 2, 0]


def test_aptos_layout_loads_in_csv_order(tmp_path: Path) -> None:
    table = write_aptos(tmp_path, LABELS)
    data = load_dataset(cfg(table, tmp_path))
    assert data.images.shape == (10, 16, 16, 3)
    np.testing.assert_array_equal(data.labels, LABELS)
    assert data.class_names == ["No DR", "Mild", "Moderate", "Severe", "Proliferative DR"]
    for image, label in zip(data.images, LABELS, strict=True):
        assert tuple(image[8, 8]) == COLOURS[label]  # decoded, resized, and kept in row order


def test_jpeg_found_without_configuring_extension_and_grayscale_made_rgb(tmp_path: Path) -> None:
    table = write_aptos(tmp_path, [0, 1, 0, 1], ext=".jpg")
    Image.new("L", (40, 30), 128).save(tmp_path / "train_images" / "0000beef.jpg")  # grayscale JPEG
    data = load_dataset(cfg(table, tmp_path))
    assert data.class_names == ["0", "1"]  # not APTOS's five grades
    assert abs(int(data.images[0, 8, 8, 0]) - 128) <= 2 and len(set(data.images[0, 8, 8])) == 1


def test_configured_columns_folder_and_extension(tmp_path: Path) -> None:
    table = write_aptos(tmp_path, [1, 0, 1], folder="pics", header="image,level")
    (tmp_path / "pics" / "0000beef.jpeg").write_bytes(b"decoy with the wrong extension")
    data = load_dataset(cfg(table, tmp_path, images=str(tmp_path / "pics"), id_column="image",
                            label_column="level", extension="png"))
    np.testing.assert_array_equal(data.labels, [1, 0, 1])


def test_images_folder_fallback_and_ids_with_extension(tmp_path: Path) -> None:
    table = write_aptos(tmp_path, [0, 1], folder="images")
    text = table.read_text().replace("beef,", "beef.png,")
    table.write_text("\ufeff" + text, encoding="utf-8")  # Excel's BOM must not hide the id column
    data = load_dataset(cfg(table, tmp_path))
    assert len(data.images) == 2


def error(table: Path, tmp_path: Path, **kw) -> str:
    with pytest.raises(DataError) as info:
        load_dataset(cfg(table, tmp_path, **kw))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_column_names_the_column_and_the_file(tmp_path: Path) -> None:
    table = write_aptos(tmp_path, LABELS)
    message = error(table, tmp_path, label_column="grade")
    assert "train.csv" in message and "no column 'grade'" in message and "data.label_column" in message


@pytest.mark.parametrize(("bad", "expected"), [
    ("abc", "line 3: diagnosis 'abc' is not an integer"),
    ("1.5", "line 3: diagnosis '1.5' is not an integer"),
    ("", "line 3: diagnosis '' is not an integer"),
    ("-1", "line 3: diagnosis '-1' is out of range"),
    ("9", "line 3: diagnosis 9 is out of range: no row has label 5"),
])
def test_bad_labels_name_the_line(tmp_path: Path, bad: str, expected: str) -> None:
    table = write_aptos(tmp_path, LABELS)
    lines = table.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + "," + bad
    table.write_text("\n".join(lines) + "\n")
    assert expected in error(table, tmp_path)


def test_integral_float_labels_are_accepted(tmp_path: Path) -> None:
    table = write_aptos(tmp_path, [0, 1])
    table.write_text(table.read_text().replace(",1\n", ",1.0\n"))
    np.testing.assert_array_equal(load_dataset(cfg(table, tmp_path)).labels, [0, 1])


def test_missing_image_names_id_and_line(tmp_path: Path) -> None:
    table = write_aptos(tmp_path, LABELS)
    (tmp_path / "train_images" / "0003beef.png").unlink()
    message = error(table, tmp_path)
    assert "line 5" in message and "'0003beef'" in message and "train_images" in message


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    table = write_aptos(tmp_path, LABELS)
    bad = tmp_path / "train_images" / "0006beef.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    message = error(table, tmp_path)
    assert str(bad) in message and "not a readable image" in message
    # Nothing half-built was left to be mistaken for a cache.
    assert not list((tmp_path / "cache").glob("*.npy")) and not list((tmp_path / "cache").glob(".*tmp"))


def test_missing_table_empty_table_and_missing_folder(tmp_path: Path) -> None:
    assert "does not exist" in error(tmp_path / "none.csv", tmp_path)
    empty = tmp_path / "empty.csv"
    empty.write_text("id_code,diagnosis\n")
    assert "no rows" in error(empty, tmp_path)
    table = write_aptos(tmp_path / "sub", [0, 1], folder="elsewhere")
    message = error(table, tmp_path)
    assert "train_images" in message and "data.images" in message
    assert "is not a folder" in error(table, tmp_path, images=str(tmp_path / "nowhere"))
