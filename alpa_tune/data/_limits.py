"""Sizes people can read, and the machine's room for them (free disk, available memory).

:func:`format_bytes` is the one way the package prints a size (``512 B``, ``70.3 MB``,
``23.7 TB``: decimal units, as ``df -H`` and disk vendors count), so a refusal never says
"0.0 GiB free but ... need 0.0 GiB".
"""

from __future__ import annotations

import errno
from pathlib import Path

from alpa_tune.data._types import DataError

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


def available_memory() -> int | None:
    """Bytes this process can still allocate without swapping: MemAvailable, capped by a cgroup
    (container) limit; ``None`` where neither can be read (not Linux)."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v2: the container's limit minus what it already uses
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_memory(need: int, what: str, hint: str) -> None:
    """Refuse, before allocating, data that cannot fit in the memory this machine has available."""
    room = available_memory()
    if room is not None and need > room:
        raise DataError(
            f"data: {what} need about {format_bytes(need)} of memory but this machine has {format_bytes(room)} "
            f"available; {hint}"
        )


def is_disk_full(exc: OSError) -> bool:
    """ENOSPC, or EDQUOT (a quota): the file system has no room for what was being written."""
    return exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
