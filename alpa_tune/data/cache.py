"""Decode once: the on-disk, memory-mapped image cache every file source shares.

A source computes a cheap fingerprint of its files (content hash or path/size/mtime) and asks
:func:`load_or_build` for ``key = f"{source}-{fingerprint}"``. On a hit the images come back
as a read-only ``np.memmap``: every fold, trial and worker on the machine maps the same file,
so the kernel's page cache holds one copy however many workers read it. On a miss the
source's plan decodes into a temporary ``.npy`` in the cache folder, which is then renamed
into place atomically (``os.replace``), metadata (labels, class names) last; a reader only
trusts an entry whose metadata exists and agrees with the array, so a crashed or concurrent
builder can never leave a half-written cache that looks valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alpa_tune.data._types import DataError, ProgressFn

if TYPE_CHECKING:
    from PIL import Image

# Bump when decoding changes (resampling, colour handling): old entries then stop matching.
CACHE_VERSION = 1
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_CHUNK = 64  # images per decode task: large enough to amortise scheduling, small for smooth progress


def default_cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("alpa-tune"))


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def make_fingerprint(*parts: object) -> str:
    """Stable short hex digest of the given parts plus the cache format version."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for part in parts:
        digest.update(b"\0" + str(part).encode())
    return digest.hexdigest()[:20]


def hash_file(path: Path) -> str:
    """Content hash: a copied or re-downloaded file with the same bytes reuses the same cache."""
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def stat_signature(root: Path, files: Sequence[Path]) -> str:
    """Hash of (relative path, size, mtime) per file: cheap to recompute, changes when any file does."""
    digest = hashlib.sha256()
    for path in files:
        try:
            st = path.stat()
        except OSError as exc:
            raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        rel = os.path.relpath(path, root)
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass
class CachePlan:
    """What to build on a miss: ``fill(out, progress)`` writes uint8 (count, size, size, 3) into ``out``."""

    count: int
    size: int
    fill: Callable[[np.ndarray, ProgressFn | None], None]
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-ready: labels, class_names, ...


def load_or_build(
    cache_dir: str | os.PathLike[str] | None,
    key: str,
    plan: Callable[[], CachePlan],
    progress: ProgressFn | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The cached images (read-only memmap) and metadata for ``key``; built via ``plan()`` on a miss."""
    folder = resolve_cache_dir(cache_dir)
    hit = _open_entry(folder, key)  # fast path: works on a read-only shared cache too
    if hit is not None:
        return hit
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"data.cache_dir: cannot create {folder} ({exc.strerror or exc})") from None
    with _build_lock(folder / f"{key}.lock") as locked:
        # Another worker may have finished the build while we waited for the lock.
        hit = _open_entry(folder, key)
        if hit is not None:
            return hit
        if locked:
            # Holding the lock, no live builder owns a temp file of this key: these are left
            # by killed builders and may be as large as the whole cache.
            for stale in folder.glob(f".{key}.*.tmp"):
                with contextlib.suppress(OSError):
                    stale.unlink()
        _build_entry(folder, key, plan(), progress)
    hit = _open_entry(folder, key)
    if hit is None:  # pragma: no cover - only if the file vanished between rename and open
        raise DataError(f"data.cache_dir: the cache entry {folder / key}.npy disappeared right after it was built")
    return hit


def cache_paths(cache_dir: str | os.PathLike[str] | None, key: str) -> tuple[Path, Path]:
    """(images .npy, metadata .json) paths of a cache entry."""
    folder = resolve_cache_dir(cache_dir)
    return folder / f"{key}.npy", folder / f"{key}.json"


def _open_entry(folder: Path, key: str) -> tuple[np.ndarray, dict[str, Any]] | None:
    array_path, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        images = np.load(array_path, mmap_mode="r")
    except (OSError, ValueError):
        return None  # missing, partial or foreign: treat as a miss and rebuild
    if (
        not isinstance(meta, dict)
        or meta.get("version") != CACHE_VERSION
        or list(images.shape) != meta.get("shape")
        or images.dtype != np.uint8
    ):
        return None
    return images, meta


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[bool]:
    """Exclusive advisory lock so N workers wait for one builder instead of all decoding.

    Yields whether the lock is held. Correctness never depends on it (temp file + atomic
    rename does that); it only saves work. Where flock is unavailable (Windows, some network
    file systems) every builder decodes.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield False
        return
    try:
        handle = open(path, "a+b")  # noqa: SIM115 - held for the lock's lifetime
    except OSError:
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            locked = True
        except OSError:  # pragma: no cover - filesystem without locks
            locked = False
        yield locked  # closing the handle releases the lock


def _build_entry(folder: Path, key: str, plan: CachePlan, progress: ProgressFn | None) -> None:
    shape = (plan.count, plan.size, plan.size, 3)
    nbytes = int(np.prod(shape))
    free = shutil.disk_usage(folder).free
    if nbytes + (64 << 20) > free:
        raise DataError(
            f"data.cache_dir: {folder} has {free / 2**30:.1f} GiB free but the decoded images need "
            f"{nbytes / 2**30:.1f} GiB; point data.cache_dir at a larger disk"
        )
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{key}.", suffix=".npy.tmp", dir=folder)
    except OSError as exc:
        raise DataError(f"data.cache_dir: cannot write to {folder} ({exc.strerror or exc})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    meta_tmp = tmp.with_suffix(".json.tmp")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        plan.fill(out, progress)
        out.flush()
        del out
        meta = {**plan.meta, "version": CACHE_VERSION, "key": key, "shape": list(shape)}
        meta_tmp.write_text(json.dumps(meta), encoding="utf-8")
        # Array first, metadata last: the metadata is what marks the entry complete.
        os.replace(tmp, folder / f"{key}.npy")
        os.replace(meta_tmp, folder / f"{key}.json")
    finally:
        for leftover in (tmp, meta_tmp):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


# --- decoding image files -------------------------------------------------------------------


def decode_image(path: Path, size: int) -> np.ndarray:
    """One image file -> uint8 (size, size, 3): RGB, resized to a square (as the paper's 256 x 256)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            # JPEG only: let the decoder downscale by 1/2..1/8 while it decodes (much faster, same result).
            img.draft("RGB", (size, size))
            rgb = _wide_to_rgb(img) if img.mode in ("I;16", "I;16B", "I;16L", "I", "F") else img.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
            return np.asarray(rgb, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: file does not exist") from None
    except Exception as exc:  # noqa: BLE001 - PIL signals corrupt files with many exception types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = reason.replace(f"'{path}'", "").replace(str(path), "").strip(" :") or type(exc).__name__
        raise DataError(f"{path}: not a readable image ({reason})") from None


def _wide_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit grayscale (microscopy, X-ray PNGs): PIL's convert would clip at 255, so scale."""
    from PIL import Image

    values = np.asarray(img, dtype=np.float32)
    # 16-bit: full range; 32-bit int or float: the image's own maximum.
    peak = 65535.0 if img.mode.startswith("I;16") else max(float(values.max()), 1e-12)
    gray = np.clip(values * (255.0 / peak), 0, 255).round().astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), "RGB")


def decode_files(paths: Sequence[Path], size: int, workers: int | None = None) -> Callable[[np.ndarray, ProgressFn | None], None]:
    """A ``CachePlan.fill`` that decodes ``paths`` in order with a small thread pool.

    Threads suffice: PIL releases the GIL while it decodes and resizes, and each task writes
    straight into its rows of the output memmap (no pickling, no copies).
    """

    def fill(out: np.ndarray, progress: ProgressFn | None) -> None:
        total = len(paths)

        def run(start: int) -> int:
            stop = min(start + _CHUNK, total)
            for i in range(start, stop):
                out[i] = decode_image(paths[i], size)
            return stop - start

        n_workers = workers or min(8, os.cpu_count() or 1)
        done = 0
        if progress:
            progress(0, total)
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            futures = [pool.submit(run, start) for start in range(0, total, _CHUNK)]
            try:
                for future in futures:  # in order, so the first bad file is the one reported
                    done += future.result()
                    if progress:
                        progress(done, total)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    return fill


def find_images(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursively, following links), sorted; hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            Path(dirpath, name) for name in filenames
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
        )
    return sorted(found)
