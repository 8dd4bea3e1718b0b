"""An export read back: the records of a JSON, TOML or Python export, and the loss they build.

Reading never executes anything: the Python snippet's values are literals parsed with ``ast``.
Needs only torch (for the loss), so ``alpa_tune.load_loss`` in a user's training code pulls in
no Optuna, SQLAlchemy or scikit-learn.
"""

from __future__ import annotations

import ast
import json
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alpa_tune.errors import BadInput
from alpa_tune.files import read_text

if TYPE_CHECKING:
    import torch

FORMATS = ("json", "toml", "python")
SUFFIXES = {"json": ".json", "toml": ".toml", "python": ".py"}
# Names the Python snippet assigns; read back with ast.literal_eval, never executed.
PY_LOSS, PY_PARAMS, PY_EXPORT = "LOSS", "PARAMS", "EXPORT"


class ExportError(BadInput):
    """Nothing to export, or the output cannot be written, or a file is not an export."""


def format_for(path: str | Path) -> str | None:
    """The format a file name implies (``.json``, ``.toml``, ``.py``), else None."""
    suffix = Path(path).suffix.lower()
    return next((fmt for fmt, s in SUFFIXES.items() if s == suffix), None)


def load_loss(path: str | Path, rank: int = 1) -> torch.nn.Module:
    """Rebuild the exported loss module from a JSON, TOML or Python export (the best by default)."""
    from alpa_tune.losses import build_loss  # torch: only when a loss is built

    record = read_record(path, rank)
    return build_loss(record["loss"], **record["params"])


def read_record(path: str | Path, rank: int = 1) -> dict[str, Any]:
    """The ``rank``-th record (1 = best) of an export file in any of the three formats."""
    records = read_records(path)
    if not 1 <= rank <= len(records):
        raise ExportError(f"{path} holds {len(records)} record(s); no rank {rank}")
    return records[rank - 1]


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of an export file, best first."""
    path = Path(path)
    text = read_text(path, "export file", ExportError)
    fmt = format_for(path)
    parsers = {"json": _parse_json, "toml": _parse_toml, "python": _parse_python}
    order = [fmt] if fmt else list(parsers)  # an unknown suffix: try each format in turn
    problem = ""
    for name in order:
        try:
            data = parsers[name](text)
            break
        except (ValueError, SyntaxError, tomllib.TOMLDecodeError) as exc:
            problem = f"{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    else:
        raise ExportError(f"{path} is not a readable alpa-tune export ({problem})")
    records = data if isinstance(data, list) else [data]
    for record in records:
        if not isinstance(record, dict) or not isinstance(record.get("loss"), str) \
                or not isinstance(record.get("params"), dict):
            raise ExportError(f"{path} is not an alpa-tune export (no 'loss' name and 'params' table)")
    if not records:
        raise ExportError(f"{path} holds no records")
    return records


def _parse_json(text: str) -> Any:
    return json.loads(text)


def _parse_toml(text: str) -> Any:
    data = tomllib.loads(text)
    if "loss" not in data and isinstance(data.get("trials"), list):
        return data["trials"]
    return data


def _parse_python(text: str) -> Any:
    """Find the snippet's literal assignments and evaluate them as literals only (no exec)."""
    tree = ast.parse(text)
    found: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in (PY_LOSS, PY_PARAMS, PY_EXPORT):
                found[name] = ast.literal_eval(node.value)  # raises ValueError on anything but a literal
    if PY_EXPORT in found:
        data = found[PY_EXPORT]
    elif PY_LOSS in found and PY_PARAMS in found:
        data = {}
    else:
        raise ValueError(f"no {PY_LOSS} and {PY_PARAMS} assignments")
    first = data[0] if isinstance(data, list) and data else data
    if isinstance(first, dict):
        # A user who edits PARAMS means it: the snippet builds the loss from LOSS and PARAMS.
        if PY_LOSS in found:
            first["loss"] = found[PY_LOSS]
        if PY_PARAMS in found:
            first["params"] = found[PY_PARAMS]
    return data
