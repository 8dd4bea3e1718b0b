"""Tuned loss settings out of a study, into a file users load with ``alpa_tune.load_loss``.

Three formats hold the same record (loss name and parameters, value, per-fold and per-class
metrics, provenance): JSON (``best.json``), TOML, and a Python snippet that builds the loss.
Reading never executes anything: the snippet's values are literals parsed with ``ast``.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import pprint
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from alpa_tune import __version__
from alpa_tune.config import to_toml
from alpa_tune.files import write_atomically
from alpa_tune.records import FORMATS, PY_EXPORT, PY_LOSS, PY_PARAMS, ExportError
from alpa_tune.search import loss_spec
from alpa_tune.storage import mask_text
from alpa_tune.study import ranked_complete_trials, stored_config

_METRIC_KEYS = ("fold_balanced_accuracy", "fold_macro_f1", "class_names", "class_recall", "class_f1",
                "epoch_seconds", "images_per_second", "device", "worker")
_VERSIONED = ("torch", "timm", "optuna", "numpy", "scikit-learn")


def ranked_trials(study: optuna.Study, top: int = 1) -> list[FrozenTrial]:
    """The ``top`` completed trials, best first (ties: the earlier trial)."""
    ranked = ranked_complete_trials(study)
    if not ranked:
        raise ExportError(f"study {study.study_name!r} has no completed trial yet")
    return ranked[:top]


def trial_record(study: optuna.Study, trial: FrozenTrial, rank: int = 1) -> dict[str, Any]:
    """Everything needed to rebuild and trust the loss: params, value, metrics, provenance."""
    config = stored_config(study)
    # The trial's own record of the loss it trained (every loss); older ALPA trials: their params.
    recorded = trial.user_attrs.get("loss")
    if isinstance(recorded, dict) and "name" in recorded and "params" in recorded:
        name, params = recorded["name"], dict(recorded["params"])
    else:
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


# -- JSON ------------------------------------------------------------------------------------
def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot export {type(value).__name__}")


# -- TOML ------------------------------------------------------------------------------------
def _toml_document(records: list[dict[str, Any]]) -> str:
    header = f"# alpa-tune export of study {records[0]['study']!r}: load with alpa_tune.load_loss(\"FILE\")\n"
    # TOML has no top-level array: several records become [[trials]] tables.
    return header + to_toml(records[0] if len(records) == 1 else {"trials": records})


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
        f"{PY_LOSS} = {best['loss']!r}\n"
        f"{PY_PARAMS} = {params}\n\n"
        f"loss = build_loss({PY_LOSS}, **{PY_PARAMS})\n\n"
        "# Metrics and provenance of the exported trial(s), best first.\n"
        f"{PY_EXPORT} = {export}\n"
    )


# -- files and versions ----------------------------------------------------------------------
def _versions() -> dict[str, str]:
    versions = {"alpa-tune": __version__, "python": platform.python_version()}
    for package in _VERSIONED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


