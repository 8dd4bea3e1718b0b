"""Decode once: the on-disk, memory-mapped image cache every file source shares.

A source computes a cheap fingerprint of its files (content hash or path/size/mtime) and asks
:func:`load_or_build` for ``key = f"{source}-{fingerprint}"``. On a hit the images come back
as a read-only ``np.memmap``: every fold, trial and worker on the machine maps the same file,
so the kernel's page cache holds one copy however many workers read it. On a miss the
source's plan decodes into a temporary ``.npy`` in the cache folder, which is then renamed
into place atomically (``os.replace``), metadata (labels, class names) last; a reader only
trusts an entry whose metadata exists and agrees with the array, so a crashed or concurrent
builder can never leave a half-written cache that looks valid.

The builder reserves the file's blocks before decoding (``posix_fallocate``), so a full disk is
a prompt :class:`DataError` naming the folder and its free space, never a crash halfway through
(writes into a memory map on a full file system kill the process); the temporary files go,
and no existing entry is touched.

**Checksums.** The metadata (written last) records a CRC-32 of every 16 MiB chunk of the
``.npy`` file, taken from the file just written (one more read of it: 1-2% of the decode). A
hit is checked against them before it is used: the chunks are read (``pread``) and summed on
up to 8 threads, since zlib and pread release the GIL. Measured on a loaded 2-core VM: 1.6-5
GB/s from the page cache, the disk's own read speed otherwise (0.9-1.1 GB/s there); that is
~30 ms for the data_pipeline benchmark's 74 MB cache (6,000 images at 64 px), and for a 30 GB
cache ~6-19 s from memory or ~30 s from that disk. An entry whose bytes changed (a zeroed
block, a truncated or foreign file) or that an older alpa-tune wrote without checksums is
deleted and rebuilt under the same key, with one line saying so through the ``log`` of
:func:`alpa_tune.data.load_dataset` (by default the ``alpa_tune.data`` logger, which prints
the bare line on stderr when logging is not configured).

**Who verifies.** Every process that loads the dataset comes through :func:`load_or_build`
(``alpa-tune run`` while it prepares the data, then each worker), so the hash must not run
once per worker: a passed check writes a stamp ``<key>.verified`` naming the file's identity
(device, inode, size, mtime, ctime). With ``verify="auto"`` (the default) a load skips the
hash when the stamp matches the file and is younger than :data:`VERIFY_TTL_S` (10 minutes):
the run that prepares the data checks the cache, the workers it starts trust that check. Any
write to the file changes its mtime and ctime and voids the stamp; a stamp written within
:data:`_RACY_S` (2 s) of the file's last change is not trusted, as git treats a "racily
clean" index, since a write in the same timestamp tick would go unseen (so the first load
after a build checks once more). Checks run under the entry's build lock: when N workers
start together on an unchecked entry, one hashes and the others wait and trust its stamp,
one hash per machine rather than N. ``verify="full"`` always hashes. On a read-only shared
cache no stamp (or lock) can be written and every load hashes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import numpy as np

from alpa_tune.data._types import DataError, ProgressFn
from alpa_tune.units import DiskFull, format_bytes, is_disk_full

if TYPE_CHECKING:
    from PIL import Image

# Format of an entry; an entry of another format is rebuilt in place (same key). 2: checksums.
CACHE_VERSION = 2
# Part of every key: bump when decoding changes (resampling, colour handling), old entries then
# stop matching. Kept apart from CACHE_VERSION so a format change keeps keys (and fingerprints).
DECODE_VERSION = 1
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_CHUNK = 64  # images per decode task: large enough to amortise scheduling, small for smooth progress
CHECKSUM_CHUNK = 16 << 20  # bytes per CRC-32: about 1,800 numbers for a 30 GB cache
VERIFY_TTL_S = 600.0  # how long a passed check spares other processes the hash
_RACY_S = 2.0  # a stamp this close to the file's last change is not trusted (timestamp granularity)
_SPARE_BYTES = 64 * 10**6  # room kept free beside the images (metadata, stamps, other files)

VerifyMode = Literal["auto", "full"]
LogFn = Callable[[str], None]
_LOG: ContextVar[LogFn | None] = ContextVar("alpa_tune_data_log", default=None)
_VERIFY: ContextVar[VerifyMode] = ContextVar("alpa_tune_data_verify", default="auto")
logger = logging.getLogger("alpa_tune.data")


def default_cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("alpa-tune"))


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def make_fingerprint(*parts: object) -> str:
    """Stable short hex digest of the given parts plus the decoding version."""
    digest = hashlib.sha256(f"v{DECODE_VERSION}".encode())
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


@contextlib.contextmanager
def cache_options(log: LogFn | None = None, verify: VerifyMode = "auto") -> Iterator[None]:
    """Within the block, :func:`load_or_build` reports through ``log`` and verifies hits per ``verify``.

    :func:`alpa_tune.data.load_dataset` sets these around a source, so sources need not pass them on.
    """
    if verify not in ("auto", "full"):
        raise ValueError(f"verify must be 'auto' or 'full', got {verify!r}")
    log_token, verify_token = _LOG.set(log), _VERIFY.set(verify)
    try:
        yield
    finally:
        _LOG.reset(log_token)
        _VERIFY.reset(verify_token)


def notify(message: str, log: LogFn | None = None) -> None:
    """One line for the user: to ``log`` (or the one set by :func:`cache_options`), else the logger."""
    target = log or _LOG.get()
    if target is not None:
        target(message)
    else:
        logger.warning(message)


def load_or_build(
    cache_dir: str | os.PathLike[str] | None,
    key: str,
    plan: Callable[[], CachePlan],
    progress: ProgressFn | None = None,
    *,
    log: LogFn | None = None,
    verify: VerifyMode | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The cached images (read-only memmap) and metadata for ``key``; built via ``plan()`` on a miss.

    A hit is checked against its checksums first (see the module docstring for when the check
    is skipped); a damaged or old-format entry is rebuilt with one line through ``log``.
    """
    mode = verify or _VERIFY.get()
    folder = resolve_cache_dir(cache_dir)
    found = _open_entry(folder, key)  # fast path: works on a read-only shared cache too
    if isinstance(found, _Entry):
        if _trusted(folder, key, found, mode):
            return found.result()
        found.close()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"data.cache_dir: cannot create {folder} ({exc.strerror or exc})") from None
    with _build_lock(folder / f"{key}.lock") as locked:
        # Another worker may have built, or checked, the entry while we waited for the lock.
        found = _open_entry(folder, key)
        if isinstance(found, _Entry):
            if _trusted(folder, key, found, mode):
                return found.result()
            problem = _verify(found)
            if problem is None:
                _write_stamp(folder, key, found.identity)
                return found.result()
            found.close()
            found = problem
        if isinstance(found, str):
            notify(f"data cache {folder / key}.npy {found}; rebuilding it", log)
            _remove_entry(folder, key, found)
        if locked:
            # Holding the lock, no live builder owns a temp file of this key: these are left
            # by killed builders and may be as large as the whole cache.
            for stale in folder.glob(f".{key}.*.tmp"):
                with contextlib.suppress(OSError):
                    stale.unlink()
        _build_entry(folder, key, plan(), progress)
    found = _open_entry(folder, key)  # just built: its checksums were taken from this very file
    if not isinstance(found, _Entry):  # pragma: no cover - only if the file vanished between rename and open
        raise DataError(f"data.cache_dir: the cache entry {folder / key}.npy disappeared right after it was built")
    return found.result()


def cache_paths(cache_dir: str | os.PathLike[str] | None, key: str) -> tuple[Path, Path]:
    """(images .npy, metadata .json) paths of a cache entry."""
    folder = resolve_cache_dir(cache_dir)
    return folder / f"{key}.npy", folder / f"{key}.json"


# --- entries: open, verify, stamp, remove -----------------------------------------------------


@dataclass
class _Entry:
    """An open entry: the memmap, its metadata, and a handle on the very file that is mapped."""

    images: np.ndarray
    meta: dict[str, Any]
    handle: IO[bytes]  # hashing reads this file, not whatever the path names by then
    identity: list[int]  # device, inode, size, mtime, ctime: changes with any write

    def result(self) -> tuple[np.ndarray, dict[str, Any]]:
        self.close()
        return self.images, self.meta

    def close(self) -> None:
        self.handle.close()  # the memmap keeps its own mapping


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _open_entry(folder: Path, key: str) -> _Entry | str | None:
    """The entry; ``None`` when absent or unfinished (no metadata yet); else why it cannot be used."""
    array_path, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None  # never finished (metadata is written last): a plain miss
    except (OSError, ValueError) as exc:
        return f"has unreadable metadata ({getattr(exc, 'strerror', None) or type(exc).__name__})"
    if not isinstance(meta, dict):
        return "has unreadable metadata (not a JSON object)"
    if meta.get("version") != CACHE_VERSION:
        older = isinstance(meta.get("version"), int) and meta["version"] < CACHE_VERSION
        return (f"was written by {'an older' if older else 'another'} alpa-tune "
                f"(cache format {meta.get('version')}, {'no checksums' if older else 'not this one'})")
    try:
        handle = open(array_path, "rb")  # noqa: SIM115 - closed by _Entry.close or below
    except FileNotFoundError:
        return "is missing (its metadata exists)"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    try:
        images = _map_npy(handle)
    except ValueError as exc:
        handle.close()
        return f"is damaged: {exc}"
    identity = _identity(os.fstat(handle.fileno()))
    checksum = meta.get("checksum")
    problem = None
    if list(images.shape) != meta.get("shape"):
        problem = f"is damaged: holds {tuple(images.shape)} but its metadata says {meta.get('shape')}"
    elif not _valid_checksum_record(checksum, identity[2]):
        problem = "has no valid checksum record"
    if problem:
        handle.close()
        return problem
    return _Entry(images, meta, handle, identity)


def _map_npy(handle: IO[bytes]) -> np.ndarray:
    """Read-only memmap of the uint8 (N, H, W, 3) array in an open ``.npy`` file; ValueError if not one."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"its .npy header cannot be read ({exc})") from None
    if fortran or dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"holds {dtype} {shape}, not uint8 (N, H, W, 3)")
    offset = handle.tell()
    size = os.fstat(handle.fileno()).st_size
    expected = offset + math.prod(shape)
    if size != expected:
        raise ValueError(f"it is {size:,} bytes but its header says {expected:,} (truncated or extended)")
    return np.memmap(handle, dtype=np.uint8, mode="r", shape=shape, offset=offset)


def _valid_checksum_record(record: Any, size: int) -> bool:
    if not isinstance(record, dict) or record.get("algorithm") != "crc32":
        return False
    chunk, sums = record.get("chunk_bytes"), record.get("chunks")
    return (isinstance(chunk, int) and chunk > 0 and record.get("size") == size and isinstance(sums, list)
            and len(sums) == -(-size // chunk) and all(isinstance(v, int) for v in sums))


def _checksums(fd: int, size: int, chunk: int) -> list[int]:
    """CRC-32 of every ``chunk`` bytes of the open file, on a few threads (zlib and pread release the GIL).

    A chunk that cannot be read in full (the file shrank) gets -1, which matches no CRC.
    """
    starts = range(0, size, chunk)
    buffers = threading.local()

    def one(start: int) -> int:
        want = min(chunk, size - start)
        buf = getattr(buffers, "buf", None)
        if buf is None:
            buf = buffers.buf = bytearray(chunk)
        view = memoryview(buf)[:want]
        got = 0
        while got < want:
            n = _read_into(fd, view[got:], start + got)
            if n == 0:
                return -1
            got += n
        return zlib.crc32(view)

    threads = min(8, os.cpu_count() or 1, len(starts)) or 1
    if threads == 1:
        return [one(start) for start in starts]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, starts))


_SEEK_LOCK = threading.Lock()


def _read_into(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` from ``offset`` of ``fd`` without moving a shared file position."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    if hasattr(os, "pread"):  # pragma: no cover - macOS before 11
        data = os.pread(fd, len(view), offset)
    else:  # pragma: no cover - Windows: no positional reads
        with _SEEK_LOCK:
            os.lseek(fd, offset, os.SEEK_SET)
            data = os.read(fd, len(view))
    view[: len(data)] = data
    return len(data)


def _verify(entry: _Entry) -> str | None:
    """``None`` if every chunk matches the checksums recorded at build time, else what differs."""
    record = entry.meta["checksum"]
    try:
        actual = _checksums(entry.handle.fileno(), record["size"], record["chunk_bytes"])
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    bad = [i for i, (a, b) in enumerate(zip(actual, record["chunks"], strict=True)) if a != b]
    if not bad:
        return None
    chunk = record["chunk_bytes"]
    return (f"is damaged: {len(bad)} of {len(actual)} chunks of {format_bytes(chunk)} differ from the checksums "
            f"recorded when it was built (first at byte {bad[0] * chunk:,})")


def _trusted(folder: Path, key: str, entry: _Entry, mode: VerifyMode) -> bool:
    """Whether a recent check of this very file (same identity) spares us the hash.

    As git does with its index: a stamp written within :data:`_RACY_S` of the file's last
    change is not trusted, since a second write in the same timestamp tick (coarse on some
    file systems) would leave mtime and ctime unchanged. Both times come from the same file
    system's clock.
    """
    if mode == "full":
        return False
    path = folder / f"{key}.verified"
    try:
        with open(path, encoding="utf-8") as handle:
            stamped_ns = os.fstat(handle.fileno()).st_mtime_ns
            stamp = json.load(handle)
        age = time.time() - float(stamp["verified_at"])
        changed_ns = max(entry.identity[3], entry.identity[4])
        return (stamp["file"] == entry.identity and 0 <= age < VERIFY_TTL_S
                and changed_ns < stamped_ns - int(_RACY_S * 1e9))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_stamp(folder: Path, key: str, identity: list[int]) -> None:
    """Record a passed check; best effort (a read-only cache just gets hashed by everyone)."""
    stamp = {"file": identity, "verified_at": time.time(), "by": f"{socket.gethostname()}:{os.getpid()}"}
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".verified.tmp", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(stamp, handle)
        os.replace(tmp, folder / f"{key}.verified")
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _remove_entry(folder: Path, key: str, reason: str) -> None:
    """Delete an unusable entry before rebuilding it: metadata first, so nobody trusts it meanwhile,
    and its space is free for the rebuild (a damaged 30 GB file need not sit beside its copy)."""
    for path in (folder / f"{key}.json", folder / f"{key}.verified", folder / f"{key}.npy"):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise DataError(
                f"data.cache_dir: the cache {folder / key}.npy {reason} and cannot be removed "
                f"({exc.strerror or exc}); delete it or point data.cache_dir at a writable folder"
            ) from None


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


# --- building an entry ------------------------------------------------------------------------


class CacheDiskFull(DataError, DiskFull):
    """The cache's disk filled up while decoding (exit 5, like a full storage disk)."""


def _write_error(folder: Path, exc: OSError, need: int) -> DataError:
    """A failed write to the cache as one line: a full disk names the folder and its free space."""
    if is_disk_full(exc):
        try:
            free = format_bytes(shutil.disk_usage(folder).free)
        except OSError:
            free = "unknown"
        return CacheDiskFull(
            f"data.cache_dir: {folder} is full ({free} free) while writing the {format_bytes(need)} of "
            f"decoded images; free space there or point data.cache_dir at a larger disk"
        )
    return DataError(f"data.cache_dir: cannot write to {folder} ({exc.strerror or exc})")


def _preallocate(path: Path) -> None:
    """Reserve every block of ``path`` now: a full disk is then ENOSPC here, not SIGBUS in the memmap."""
    if not hasattr(os, "posix_fallocate"):  # pragma: no cover - macOS, Windows: the free-space check only
        return
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


def _build_entry(folder: Path, key: str, plan: CachePlan, progress: ProgressFn | None) -> None:
    shape = (plan.count, plan.size, plan.size, 3)
    nbytes = math.prod(shape)
    free = shutil.disk_usage(folder).free
    if nbytes + _SPARE_BYTES > free:
        raise DataError(
            f"data.cache_dir: {folder} has {format_bytes(free)} free but the decoded images need "
            f"{format_bytes(nbytes)} ({plan.count:,} images of 3 x {plan.size} x {plan.size} bytes) "
            f"plus {format_bytes(_SPARE_BYTES)} to spare; point data.cache_dir at a larger disk"
        )
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{key}.", suffix=".npy.tmp", dir=folder)
    except OSError as exc:
        raise _write_error(folder, exc, nbytes) from None
    os.close(fd)
    tmp = Path(tmp_name)
    meta_tmp = tmp.with_suffix(".json.tmp")
    try:
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            _preallocate(tmp)
        except OSError as exc:
            raise _write_error(folder, exc, nbytes) from None
        plan.fill(out, progress)
        try:
            out.flush()
            del out
            with open(tmp, "rb") as written:
                size = os.fstat(written.fileno()).st_size
                checksum = {"algorithm": "crc32", "chunk_bytes": CHECKSUM_CHUNK, "size": size,
                            "chunks": _checksums(written.fileno(), size, CHECKSUM_CHUNK)}
                meta = {**plan.meta, "version": CACHE_VERSION, "key": key, "shape": list(shape), "checksum": checksum}
                meta_tmp.write_text(json.dumps(meta), encoding="utf-8")
                # Array first, metadata last: the metadata is what marks the entry complete.
                os.replace(tmp, folder / f"{key}.npy")
                os.replace(meta_tmp, folder / f"{key}.json")
        except OSError as exc:
            raise _write_error(folder, exc, nbytes) from None
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
