"""Output files: one atomic writer and one write-permission probe for every file alpa-tune writes.

Exports, reports and comparisons are written whole or not at all: a crash or a full disk leaves
the previous file as it was, never a half-written one. (The image cache and the storage files
have their own crash-safe formats and do not come here.)
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from alpa_tune.errors import BadInput
from alpa_tune.units import DiskFull, format_bytes, free_space, is_disk_full


def read_text(path: str | os.PathLike[str], what: str, error: type[BadInput] = BadInput) -> str:
    """A user's file as text, or one ``error`` line: ``{what} PATH does not exist`` / ``cannot be read``."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{what} {path} cannot be read: {exc}") from None


class OutputDiskFull(DiskFull):
    """An output file did not fit on its disk (exit 5, like a full storage or cache disk)."""


def write_atomically(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` whole, creating its folder if needed.

    The bytes go to a temporary file in the same folder (so the rename cannot cross filesystems),
    are flushed to the disk, and only then replace ``path``. On any failure the temporary file is
    removed and ``path`` is untouched. A full disk raises :class:`OutputDiskFull` naming the path
    and the free space; any other failure re-raises the ``OSError`` for the caller to phrase.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    # A random name: two writers of the same file never share a temporary file.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # 0o666 less the umask, as a plain open() would create it (mkstemp's 0o600 would stick).
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on the disk before the name points at them
        os.replace(temporary, path)
    except BaseException as exc:  # KeyboardInterrupt too: never leave a temporary file behind
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        if isinstance(exc, OSError) and is_disk_full(exc):
            raise disk_full_error(path) from None
        raise
    _sync_folder(path.parent)
    return path


def disk_full_error(path: Path) -> OutputDiskFull:
    """One line naming the output that did not fit and what is left on its disk."""
    free = free_space(path)
    left = f"{format_bytes(free)} free" if free is not None else "free space unknown"
    kept = "the previous file is unchanged" if path.exists() else "nothing was written"
    return OutputDiskFull(f"{path}: the disk is full ({left}); {kept}. Free space or write elsewhere, then run again")


def check_writable(folder: str | os.PathLike[str]) -> Path:
    """Create ``folder`` if needed and prove a file can be created in it: fail before hours of work.

    Raises ``OSError`` (``strerror`` says why, ``filename`` is the folder): the caller phrases it
    for its own option. Permission bits alone would not do: root ignores them, and a read-only
    mount or a full disk refuses root too.
    """
    folder = Path(folder)
    probe = folder / f".write-test.{secrets.token_hex(4)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(folder)) from None
    return folder


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable; some filesystems cannot fsync a folder, which is fine."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
