"""``medmnist``: an official MedMNIST ``.npz`` (e.g. ``dermamnist_224.npz`` from zenodo).

The file holds ``{train,val,test}_images`` (N, H, W) grayscale or (N, H, W, 3) RGB uint8 at
28/64/128/224 px and ``{train,val,test}_labels`` (N, 1). By default the three splits are
pooled (the paper re-splits 80/20 itself); with ``data.official_splits`` the order is kept
(train, val, test) and the test rows become the dataset's ``holdout_index``.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np

from alpa_tune.config import DataConfig
from alpa_tune.data import register_source
from alpa_tune.data._types import DataError, ImageDataset, ProgressFn
from alpa_tune.data.cache import CachePlan, hash_file, load_or_build, make_fingerprint

SPLITS = ("train", "val", "test")
# Class names of the single-label MedMNIST sets the paper's users are likely to bring.
# dermamnist uses the HAM10000 codes, the names the paper's tables use.
KNOWN_CLASS_NAMES = {
    "dermamnist": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast", "immature granulocyte",
                   "lymphocyte", "monocyte", "neutrophil", "platelet"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal, benign"],
}
_RESIZE_BATCH = 256  # images resized per torch call: bounded memory for 224 px sets


@register_source("medmnist")
def load_medmnist(cfg: DataConfig, progress: ProgressFn | None = None) -> ImageDataset:
    if not cfg.path:
        raise DataError("data.path: set it to a MedMNIST .npz file, e.g. data.path = \"dermamnist_224.npz\"")
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise DataError(f"data.path: {path} does not exist (download it from https://zenodo.org/records/10519652)")
    fingerprint = make_fingerprint("medmnist", hash_file(path), cfg.image_size, cfg.official_splits)

    def plan() -> CachePlan:
        splits = _read_splits(path)
        labels = np.concatenate([lab for _, lab in splits])
        class_names = _class_names(path, labels)
        sizes = [len(lab) for _, lab in splits]
        meta = {
            "source": "medmnist", "file": str(path), "labels": labels.tolist(), "class_names": class_names,
            # Pooled or not, rows stay in split order; only the hold-out choice differs.
            "holdout_index": list(range(sizes[0] + sizes[1], sum(sizes))) if cfg.official_splits else None,
        }

        def fill(out: np.ndarray, report: ProgressFn | None) -> None:
            done, total = 0, len(out)
            for images, _ in splits:
                for start in range(0, len(images), _RESIZE_BATCH):
                    chunk = images[start : start + _RESIZE_BATCH]
                    out[done : done + len(chunk)] = _to_rgb(chunk, cfg.image_size)
                    done += len(chunk)
                    if report:
                        report(done, total)

        return CachePlan(count=len(labels), size=cfg.image_size, fill=fill, meta=meta)

    images, meta = load_or_build(cfg.cache_dir, f"medmnist-{fingerprint}", plan, progress)
    holdout = meta.get("holdout_index")
    return ImageDataset(
        images=images,
        labels=np.asarray(meta["labels"], dtype=np.int64),
        class_names=list(meta["class_names"]),
        fingerprint=fingerprint,
        holdout_index=np.asarray(holdout, dtype=np.int64) if holdout is not None else None,
    )


def _read_splits(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(images, labels int64 (N,))] for train, val, test, each checked."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    with archive:
        keys = set(archive.files)
        missing = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels") if f"{s}_{kind}" not in keys]
        if missing:
            raise DataError(f"{path}: missing key(s) {', '.join(missing)} (a MedMNIST .npz has train/val/test _images and _labels)")
        splits = []
        for split in SPLITS:
            try:
                images, labels = archive[f"{split}_images"], archive[f"{split}_labels"]
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
                raise DataError(f"{path}: {split} arrays cannot be read ({exc})") from None
            splits.append((_check_images(path, split, images), _check_labels(path, split, labels, len(images))))
    return splits


def _check_images(path: Path, split: str, images: np.ndarray) -> np.ndarray:
    ok_shape = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))
    if not ok_shape or images.dtype != np.uint8:
        raise DataError(
            f"{path}: {split}_images must be uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}"
        )
    return images


def _check_labels(path: Path, split: str, labels: np.ndarray, count: int) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(f"{path}: {split}_labels has {labels.shape[1]} columns (multi-label MedMNIST sets are not supported)")
    flat = labels.reshape(-1)
    if len(flat) != count:
        raise DataError(f"{path}: {split}_labels has {len(flat)} labels for {count} images")
    if flat.dtype.kind not in "iuf" or (flat.dtype.kind == "f" and not np.all(np.isfinite(flat) & (flat == np.round(flat)))):
        bad = flat[0] if flat.dtype.kind not in "iuf" else flat[~(np.isfinite(flat) & (flat == np.round(flat)))][0]
        raise DataError(f"{path}: {split}_labels must be integers, found {bad!r}")
    flat = flat.astype(np.int64)
    if len(flat) and flat.min() < 0:
        raise DataError(f"{path}: {split}_labels holds a negative label ({flat.min()})")
    return flat


def _class_names(path: Path, labels: np.ndarray) -> list[str]:
    known = KNOWN_CLASS_NAMES.get(re.sub(r"_\d+$", "", path.stem).lower())
    highest = int(labels.max()) if len(labels) else -1
    if known is not None:
        if highest >= len(known):
            raise DataError(f"{path}: label {highest} is out of range for {len(known)} classes (0..{len(known) - 1})")
        return list(known)
    return [f"class_{c}" for c in range(highest + 1)]


def _to_rgb(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (B, h, w[, 1|3]) -> uint8 (B, size, size, 3), antialiased bilinear like PIL's resize."""
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.shape[1:3] == (size, size):
        return images
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
