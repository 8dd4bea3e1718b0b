"""Markdown tables from plain strings: the one renderer for output that must survive a pipe.

A rich table fits itself to the terminal and, piped into a log at 80 columns, cuts every cell
to a few characters; a Markdown line is as wide as its content, greps cleanly and renders on
GitHub. Used by compare's PREFIX.md and by every command's tables when stdout is not a terminal.
"""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    """``header`` and ``rows`` as a GitHub Markdown table (no trailing newline); ``right[k]``
    right-aligns column k (numbers)."""
    right = list(right) if right is not None else [False] * len(header)
    lines = [_row(header), "|" + "|".join("--:" if r else "---" for r in right) + "|"]
    lines += [_row(row) for row in rows]
    return "\n".join(lines)


def _row(cells: Sequence[str]) -> str:
    # A "|" would open a new column and a newline would end the row: escape one, flatten the other.
    return "| " + " | ".join(str(c).replace("\n", " ").replace("|", "\\|") for c in cells) + " |"
