"""Tuned loss settings out of a study, into a file users load with ``alpa_tune.load_loss``."""

from __future__ import annotations

import json
import math
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from alpa_tune import __version__
from alpa_tune.search import loss_spec, stored_config

FORMATS = ("json",)
_METRIC_KEYS = ("fold_balanced_accuracy", "fold_macro_f1", "class_names", "class_recall", "class_f1",
                "epoch_seconds", "images_per_second", "device", "worker")


class ExportError(ValueError):
    """Nothing to export, or the output cannot be written."""


def ranked_trials(study: optuna.Study, top: int = 1) -> list[FrozenTrial]:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value)]
    if not complete:
        raise ExportError(f"study {study.study_name!r} has no completed trial yet")
    return sorted(complete, key=lambda t: (-t.value, t.number))[:top]


def trial_record(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
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
        "dataset_fingerprint": trial.user_attrs.get("dataset_fingerprint"),
        "config": config.to_dict(),
        "alpa_tune_version": __version__,
        "versions": _versions(),
    }


def write_records(records: list[dict[str, Any]], path: Path, fmt: str = "json") -> None:
    """Write one record (a dict) or, for --top K > 1, a list of them."""
    if fmt not in FORMATS:
        raise ExportError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    payload: Any = records[0] if len(records) == 1 else records
    text = json.dumps(payload, indent=2, allow_nan=False, default=_json_default) + "\n"
    _write_atomically(path, text)


def load_loss(path: str | Path) -> torch.nn.Module:
    """Rebuild the exported loss module from a best.json (first record when it holds several)."""
    from alpa_tune.losses import build_loss

    record = read_record(path)
    return build_loss(record["loss"], **record["params"])


def read_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path} is not a readable alpa-tune export: {exc}") from None
    record = data[0] if isinstance(data, list) and data else data
    if not isinstance(record, dict) or "loss" not in record or "params" not in record:
        raise ExportError(f"{path} is not an alpa-tune export (no 'loss' and 'params')")
    return record


def _write_atomically(path: Path, text: str) -> None:
    path = Path(path)
    if not path.parent.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExportError(f"cannot create folder {path.parent}: {exc.strerror}") from None
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)  # never a half-written file where the old one was
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror}") from None


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("torch", "timm", "optuna"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot export {type(value).__name__}")
