"""``csv``: a label table plus an image folder, the APTOS2019 layout.

``train.csv`` has an id column (``data.id_column``, default ``id_code``) and an integer label
column (``data.label_column``, default ``diagnosis``); image ``<id><ext>`` lives in
``data.images``, by default the folder ``<csv stem>_images`` next to the CSV (``train.csv`` ->
``train_images/``, as Kaggle ships it) or else ``images/``. The extension is
``data.extension`` when set, otherwise found per id among the common image extensions (an id
that already names its file, ``abc.png``, works too).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from alpa_tune.config import DataConfig
from alpa_tune.data import register_source
from alpa_tune.data._types import DataError, ImageDataset, ProgressFn
from alpa_tune.data.cache import (
    IMAGE_EXTENSIONS,
    CachePlan,
    decode_files,
    hash_file,
    load_or_build,
    make_fingerprint,
    stat_signature,
)

# APTOS2019's grades, used when the labels are exactly its 0..4.
APTOS_CLASS_NAMES = ["No DR", "Mild", "Moderate", "Severe", "Proliferative DR"]


@register_source("csv")
def load_csv(cfg: DataConfig, progress: ProgressFn | None = None) -> ImageDataset:
    if not cfg.path:
        raise DataError("data.path: set it to the label CSV, e.g. data.path = \"aptos2019/train.csv\"")
    table = Path(cfg.path).expanduser()
    if not table.is_file():
        raise DataError(f"data.path: {table} does not exist")
    ids, labels, lines = read_table(table, cfg.id_column, cfg.label_column)
    folder = image_folder(table, cfg.images)
    files = match_files(folder, ids, lines, table, cfg.extension)
    class_names = APTOS_CLASS_NAMES if cfg.label_column == "diagnosis" and labels.max() == 4 else [
        str(c) for c in range(int(labels.max()) + 1)
    ]
    fingerprint = make_fingerprint(
        "csv", hash_file(table), cfg.id_column, cfg.label_column, stat_signature(folder, files), cfg.image_size
    )

    def plan() -> CachePlan:
        return CachePlan(count=len(files), size=cfg.image_size, fill=decode_files(files, cfg.image_size),
                         meta={"source": "csv", "file": str(table), "images": str(folder)})

    images, _ = load_or_build(cfg.cache_dir, f"csv-{fingerprint}", plan, progress)
    return ImageDataset(images, labels, list(class_names), fingerprint)


def read_table(table: Path, id_column: str, label_column: str) -> tuple[list[str], np.ndarray, list[int]]:
    """(ids, int64 labels, CSV line numbers) from the CSV; every bad row is a one-line DataError naming the line."""
    try:
        with open(table, newline="", encoding="utf-8-sig") as handle:  # -sig: tolerate Excel's BOM
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = columns
            for key, column in (("data.id_column", id_column), ("data.label_column", label_column)):
                if column not in columns:
                    found = ", ".join(columns) if columns else "none"
                    raise DataError(f"{table}: no column {column!r} (columns: {found}); set {key}")
            ids, labels, lines = [], [], []
            first_line: dict[str, int] = {}
            for row in reader:
                line = reader.line_num
                ident, raw = (row.get(id_column) or "").strip(), (row.get(label_column) or "").strip()
                if not ident:
                    raise DataError(f"{table} line {line}: empty {id_column}")
                if ident in first_line:  # one image twice, perhaps under two labels
                    raise DataError(
                        f"{table} line {line}: {id_column} {ident!r} repeats line {first_line[ident]} "
                        f"(each image must appear once)"
                    )
                first_line[ident] = line
                ids.append(ident)
                labels.append(_parse_label(raw, table, line, label_column))
                lines.append(line)
    except UnicodeDecodeError as exc:
        raise DataError(f"{table}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise DataError(f"{table}: not a readable CSV ({exc})") from None
    except OSError as exc:
        raise DataError(f"{table}: cannot be read ({exc.strerror or exc})") from None
    if not ids:
        raise DataError(f"{table}: has a header but no rows")
    array = np.asarray(labels, dtype=np.int64)
    # A gap in 0..max is almost always a typo (a 40 among 0..4): name the row instead of training 41 heads.
    present = np.bincount(array)
    empty = np.flatnonzero(present == 0)
    if len(empty):
        first = int(np.flatnonzero(array > empty[0])[0])
        raise DataError(
            f"{table} line {lines[first]}: {label_column} {array[first]} is out of range: no row has label "
            f"{empty[0]} (labels must be 0..K-1 with every class present)"
        )
    return ids, array, lines


def _parse_label(raw: str, table: Path, line: int, column: str) -> int:
    try:
        value = float(raw)
    except ValueError:
        raise DataError(f"{table} line {line}: {column} {raw!r} is not an integer class label") from None
    if not value.is_integer():  # also rejects nan and inf
        raise DataError(f"{table} line {line}: {column} {raw!r} is not an integer class label")
    if value < 0:
        raise DataError(f"{table} line {line}: {column} {raw!r} is out of range (labels start at 0)")
    return int(value)


def image_folder(table: Path, images: str | None) -> Path:
    if images:
        folder = Path(images).expanduser()
        if not folder.is_dir():
            raise DataError(f"data.images: {folder} is not a folder")
        return folder
    candidates = [table.with_name(f"{table.stem}_images"), table.with_name("images")]
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise DataError(
        f"data.images: not set and neither {candidates[0]} nor {candidates[1]} exists; set it to the image folder"
    )


def match_files(folder: Path, ids: list[str], lines: list[int], table: Path, extension: str | None) -> list[Path]:
    """The image file of every id, in CSV order; a missing one is a DataError naming id and row."""
    try:
        names = {entry.name for entry in os.scandir(folder) if not entry.name.startswith(".")}
    except OSError as exc:
        raise DataError(f"data.images: {folder} cannot be listed ({exc.strerror or exc})") from None
    if extension:
        ext = extension if extension.startswith(".") else f".{extension}"
        candidates: tuple[str, ...] = (ext,)
    else:
        candidates = IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS)
    files = []
    line_of: dict[str, int] = {}
    for row, ident in zip(lines, ids, strict=True):
        name = next((ident + ext for ext in candidates if ident + ext in names), None)
        if name is None and ident in names and ident.lower().endswith(IMAGE_EXTENSIONS):
            name = ident
        if name is None:
            tried = f"{ident}{candidates[0]}" if extension else f"{ident}.png/.jpg/..."
            raise DataError(f"{table} line {row}: image {tried} for {ident!r} not found in {folder}")
        if name in line_of:  # two ids for one file: 'abc' and 'abc.png'
            raise DataError(
                f"{table} line {row}: {ident!r} names the image {name} of line {line_of[name]} again "
                f"(each image must appear once)"
            )
        line_of[name] = row
        files.append(folder / name)
    return files
