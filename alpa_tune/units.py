"""Sizes people can read, and full disks: one formatter and one test for every such message."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

_SQLITE_FULL = 13
_PG_DISK_FULL = "53100"


class DiskFull(Exception):
    """Mixed into the errors that mean "a disk is full": the CLI exits 5 for every one of them."""


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` or anything it was raised from says the disk is full.

    ENOSPC / EDQUOT from the OS, SQLite's SQLITE_FULL, PostgreSQL's disk_full. Optuna re-raises
    SQLite's as "invalid data in the commit, e.g. exceeding max length"; the cause chain still
    carries the real error.
    """
    import sqlite3

    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(current, sqlite3.Error) and getattr(current, "sqlite_errorcode", None) == _SQLITE_FULL:
            return True
        if getattr(current, "pgcode", None) == _PG_DISK_FULL:
            return True
        pending += [current.__cause__, current.__context__, getattr(current, "orig", None)]
    return False

_UNITS = ("B", "KB", "MB", "GB", "TB", "PB")


def format_bytes(count: float) -> str:
    """``1536 -> '1.5 KB'``, ``23.7e12 -> '23.7 TB'`` (decimal units, as disks are sold)."""
    value = float(count)
    for unit in _UNITS:
        if abs(value) < 1000 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def free_space(path: str | os.PathLike[str]) -> int | None:
    """Free bytes on the filesystem holding ``path`` (its nearest existing folder); None if unknown."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None
