"""Tuned loss settings out of a study, into a file users load with ``alpa_tune.load_loss``.

Three formats hold the same record (loss name and parameters, value, per-fold and per-class
metrics, provenance): JSON (``best.json``), TOML, and a Python snippet that builds the loss.
Reading never executes anything: the snippet's values are literals parsed with ``ast``.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import platform
import pprint
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial

from alpa_tune import __version__
from alpa_tune.config import to_toml
from alpa_tune.files import write_atomically
from alpa_tune.search import loss_spec, ranked_complete_trials, stored_config
from alpa_tune.storage import mask_text

FORMATS = ("json", "toml", "python")
SUFFIXES = {"json": ".json", "toml": ".toml", "python": ".py"}
_METRIC_KEYS = ("fold_balanced_accuracy", "fold_macro_f1", "class_names", "class_recall", "class_f1",
                "epoch_seconds", "images_per_second", "device", "worker")
_VERSIONED = ("torch", "timm", "optuna", "numpy", "scikit-learn")
# Names the Python snippet assigns; read back with ast.literal_eval, never executed.
_PY_LOSS, _PY_PARAMS, _PY_EXPORT = "LOSS", "PARAMS", "EXPORT"


class ExportError(ValueError):
    """Nothing to export, or the output cannot be written, or a file is not an export."""


def ranked_trials(study: optuna.Study, top: int = 1) -> list[FrozenTrial]:
    """The ``top`` completed trials, best first (ties: the earlier trial)."""
    ranked = ranked_complete_trials(study)
    if not ranked:
        raise ExportError(f"study {study.study_name!r} has no completed trial yet")
    return ranked[:top]


def trial_record(study: optuna.Study, trial: FrozenTrial, rank: int = 1) -> dict[str, Any]:
    """Everything needed to rebuild and trust the loss: params, value, metrics, provenance."""
    config = stored_config(study)
    name, params = loss_spec(trial.params, config.search.space)
    return {
        "loss": name,
        "params": params,
        "value": trial.value,
        "metric": "mean fold balanced accuracy",
        "metrics": {key: trial.user_attrs[key] for key in _METRIC_KEYS if key in trial.user_attrs},
        "study": study.study_name,
        "trial": trial.number,
        "rank": rank,
        "trial_completed": trial.datetime_complete.isoformat(timespec="seconds") if trial.datetime_complete else None,
        "dataset_fingerprint": trial.user_attrs.get("dataset_fingerprint"),
        "config": config.to_dict(),
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "alpa_tune_version": __version__,
        "versions": _versions(),
    }


def study_records(study: optuna.Study, top: int = 1) -> list[dict[str, Any]]:
    """Records of the best ``top`` trials, best first."""
    return [trial_record(study, t, rank) for rank, t in enumerate(ranked_trials(study, top), start=1)]


def render_records(records: list[dict[str, Any]], fmt: str = "json") -> str:
    """The text of an export: one record, or (for --top K > 1) all of them, best first."""
    if fmt not in FORMATS:
        raise ExportError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if not records:
        raise ExportError("nothing to export")
    if fmt == "json":
        payload: Any = records[0] if len(records) == 1 else records
        text = json.dumps(payload, indent=2, allow_nan=False, default=_json_default) + "\n"
    elif fmt == "toml":
        text = _toml_document(records)
    else:
        text = _python_snippet(records)
    # A last guard: whatever reached a record (a path, a worker name), no URL password leaves.
    return mask_text(text)


def write_records(records: list[dict[str, Any]], path: Path, fmt: str = "json") -> None:
    """Write one record or, for --top K > 1, a list of them."""
    path = Path(path)
    text = render_records(records, fmt)
    try:
        write_atomically(path, text)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror}") from None


def format_for(path: str | Path) -> str | None:
    """The format a file name implies (``.json``, ``.toml``, ``.py``), else None."""
    suffix = Path(path).suffix.lower()
    return next((fmt for fmt, s in SUFFIXES.items() if s == suffix), None)


def load_loss(path: str | Path, rank: int = 1) -> torch.nn.Module:
    """Rebuild the exported loss module from a JSON, TOML or Python export (the best by default)."""
    from alpa_tune.losses import build_loss

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
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ExportError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} is not a readable alpa-tune export: {exc}") from None
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


# -- JSON ------------------------------------------------------------------------------------
def _parse_json(text: str) -> Any:
    return json.loads(text)


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot export {type(value).__name__}")


# -- TOML ------------------------------------------------------------------------------------
def _toml_document(records: list[dict[str, Any]]) -> str:
    header = f"# alpa-tune export of study {records[0]['study']!r}: load with alpa_tune.load_loss(\"FILE\")\n"
    # TOML has no top-level array: several records become [[trials]] tables.
    return header + to_toml(records[0] if len(records) == 1 else {"trials": records})


def _parse_toml(text: str) -> Any:
    data = tomllib.loads(text)
    if "loss" not in data and isinstance(data.get("trials"), list):
        return data["trials"]
    return data


# -- Python snippet --------------------------------------------------------------------------
def _python_snippet(records: list[dict[str, Any]]) -> str:
    best = records[0]
    versions = ", ".join(f"{k} {v}" for k, v in best.get("versions", {}).items())
    params = "{\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in best["params"].items()) + "}"
    export = pprint.pformat(records[0] if len(records) == 1 else records, sort_dicts=False, width=100)
    return (
        f'"""Tuned loss from alpa-tune: study {best["study"]!r}, trial {best["trial"]}, '
        f'{best.get("metric", "value")} {best["value"]:.4f}.\n\n'
        f"Dataset fingerprint {best.get('dataset_fingerprint')}; exported {best.get('exported_at')} with {versions}.\n"
        "alpa_tune.load_loss(THIS_FILE) reads the literals below without running this file.\n"
        '"""\n\n'
        "from alpa_tune import build_loss\n\n"
        f"{_PY_LOSS} = {best['loss']!r}\n"
        f"{_PY_PARAMS} = {params}\n\n"
        f"loss = build_loss({_PY_LOSS}, **{_PY_PARAMS})\n\n"
        "# Metrics and provenance of the exported trial(s), best first.\n"
        f"{_PY_EXPORT} = {export}\n"
    )


def _parse_python(text: str) -> Any:
    """Find the snippet's literal assignments and evaluate them as literals only (no exec)."""
    tree = ast.parse(text)
    found: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in (_PY_LOSS, _PY_PARAMS, _PY_EXPORT):
                found[name] = ast.literal_eval(node.value)  # raises ValueError on anything but a literal
    if _PY_EXPORT in found:
        data = found[_PY_EXPORT]
    elif _PY_LOSS in found and _PY_PARAMS in found:
        data = {}
    else:
        raise ValueError(f"no {_PY_LOSS} and {_PY_PARAMS} assignments")
    first = data[0] if isinstance(data, list) and data else data
    if isinstance(first, dict):
        # A user who edits PARAMS means it: the snippet builds the loss from LOSS and PARAMS.
        if _PY_LOSS in found:
            first["loss"] = found[_PY_LOSS]
        if _PY_PARAMS in found:
            first["params"] = found[_PY_PARAMS]
    return data


# -- files and versions ----------------------------------------------------------------------
def _versions() -> dict[str, str]:
    versions = {"alpa-tune": __version__, "python": platform.python_version()}
    for package in _VERSIONED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


__all__ = ["ExportError", "FORMATS", "format_for", "load_loss", "ranked_trials", "read_record", "read_records",
           "render_records", "study_records", "trial_record", "write_records"]
