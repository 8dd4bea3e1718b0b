"""Sizes people can read: one formatter for every free-space and size message."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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
