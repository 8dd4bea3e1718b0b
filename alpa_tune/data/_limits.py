"""The machine's room for the data (available memory, a full disk), in sizes people can read.

Every size is printed with :func:`alpa_tune.units.format_bytes` (``13.8 KB``, ``23.7 TB``),
so a refusal never says "0.0 GiB free but ... need 0.0 GiB".
"""

from __future__ import annotations

from pathlib import Path

from alpa_tune.data._types import DataError
from alpa_tune.units import format_bytes


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
