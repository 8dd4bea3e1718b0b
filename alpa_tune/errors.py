"""What a user did wrong, and the exit codes every process of alpa-tune shares.

Every error a user can fix (config, path, URL, data file, study name, flag) derives from
:class:`BadInput`; the console entry (``entry.py``) maps it, in one place, to one ``error:``
line and exit code 2.
A leaf module: stdlib only, so any module (the loss library included) may raise it.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2  # a user's mistake, said in one line before any work
EXIT_GAVE_UP = 3  # a worker whose trials kept failing (see its log)
EXIT_STORAGE_LOST = 4  # the storage stayed away past workers.storage_patience
EXIT_DISK_FULL = 5  # the storage's, the cache's or the output folder's disk is full


class BadInput(ValueError):
    """A mistake in what the user gave us; the message is one line naming it (exit 2)."""
