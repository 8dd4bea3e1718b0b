"""Sizes people can read, and the machine's room for them (free disk, available memory).

:func:`format_bytes` is the one way the package prints a size (``512 B``, ``70.3 MB``,
``23.7 TB``: decimal units, as ``df -H`` and disk vendors count), so a refusal never says
"0.0 GiB free but ... need 0.0 GiB".
"""

from __future__ import annotations

import errno

_UNITS = ("KB", "MB", "GB", "TB", "PB", "EB")


def format_bytes(count: float) -> str:
    """``count`` bytes in the unit that leaves 1 to 3 digits before the point: 0 B, 999 B, 1.0 KB, 23.7 TB."""
    value = float(count)
    if abs(value) < 1000:
        return f"{int(value)} B"
    for unit in _UNITS:
        value /= 1000
        if abs(value) < 999.95 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def is_disk_full(exc: OSError) -> bool:
    """ENOSPC, or EDQUOT (a quota): the file system has no room for what was being written."""
    return exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
