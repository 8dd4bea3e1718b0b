"""``folder``: one subfolder per class (``root/<class>/**/*.png``), the BoneMarrow layout.

Class names are the subfolder names in sorted order (as torchvision's ImageFolder); images
may sit in nested folders inside a class (the bone-marrow release groups them by thousands),
and symlinked class folders are followed, so a subset of classes can be a folder of links.
Hidden entries and non-image files (``Thumbs.db``, ``.DS_Store``) are ignored.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from alpa_tune.config import DataConfig
from alpa_tune.data import register_source
from alpa_tune.data._types import DataError, ImageDataset, ProgressFn
from alpa_tune.data.cache import CachePlan, decode_files, find_images, load_or_build, make_fingerprint, stat_signature


@register_source("folder")
def load_folder(cfg: DataConfig, progress: ProgressFn | None = None) -> ImageDataset:
    if not cfg.path:
        raise DataError("data.path: set it to the folder that holds one subfolder per class")
    root = Path(cfg.path).expanduser()
    class_names, files, labels = scan_classes(root)
    fingerprint = make_fingerprint("folder", stat_signature(root, files), cfg.image_size)

    def plan() -> CachePlan:
        return CachePlan(count=len(files), size=cfg.image_size, fill=decode_files(files, cfg.image_size),
                         meta={"source": "folder", "root": str(root), "class_names": class_names})

    images, _ = load_or_build(cfg.cache_dir, f"folder-{fingerprint}", plan, progress)
    return ImageDataset(images, labels, class_names, fingerprint)


def scan_classes(root: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """(class names, image files, int64 labels); an empty root or class folder is a DataError."""
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder")
    try:
        class_names = sorted(
            entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith(".")
        )
    except OSError as exc:
        raise DataError(f"data.path: {root} cannot be listed ({exc.strerror or exc})") from None
    if not class_names:
        raise DataError(f"data.path: {root} has no class subfolders (expected {root}/<class name>/<image files>)")
    if len(class_names) < 2:
        raise DataError(f"data.path: {root} has only one class subfolder ({class_names[0]}); at least two are needed")
    _refuse_shared_folders(root, class_names)
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        found = find_images(root / name)
        if not found:
            raise DataError(f"{root / name}: class folder holds no image files (.png, .jpg, ...)")
        files.extend(found)
        labels.extend([label] * len(found))
    return class_names, files, np.asarray(labels, dtype=np.int64)


def _refuse_shared_folders(root: Path, class_names: list[str]) -> None:
    """Two class links to one folder (or one inside the other) would put its images under two labels."""
    seen: dict[Path, str] = {}
    for name in class_names:
        real = (root / name).resolve()
        for other_real, other in seen.items():
            if real == other_real or other_real in real.parents or real in other_real.parents:
                raise DataError(
                    f"data.path: class folders {other!r} and {name!r} share images ({other_real} and {real}); "
                    f"each image must belong to one class"
                )
        seen[real] = name
