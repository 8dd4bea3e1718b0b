"""Tuned ALPA against the baselines on the held-out split (the paper's Tables 3 to 5).

Every loss trains on the same development 80 % (``training.split_holdout``, the split the
search cross-validated) with the same seeds, and is scored once on the held-out 20 % the
search never saw. Independent trainings run in parallel processes where the machine has room.
The result is one JSON-ready dict (stored in the study as the ``comparison`` user attribute);
:mod:`alpa_tune.compare_table` lays it out as the paper's Table 3 (terminal, Markdown, CSV, report).
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alpa_tune.compare_table import to_csv, to_markdown
from alpa_tune.config import StudyConfig, config_from_dict
from alpa_tune.errors import BadInput
from alpa_tune.files import check_writable, write_atomically
from alpa_tune.records import read_record
from alpa_tune.storage import StorageError, journal_or_sqlite_path, mask_url, open_storage

COMPARISON_ATTR = "comparison"
DEFAULT_LOSSES = ("ce", "focal", "asl", "alpa")
TUNED = "alpa"  # the label of the tuned loss read from best.json
# Each baseline with its paper's default settings (cb and ldam get the training class counts).
BASELINES: dict[str, dict[str, Any]] = {
    "ce": {},  # softmax cross-entropy
    "bce": {},  # sigmoid BCE against one-hot targets
    "focal": {"alpha": 0.25, "gamma": 2.0},  # Lin et al. 2017
    "asl": {"gamma_pos": 0.0, "gamma_neg": 4.0, "clip": 0.05},  # Ridnik et al. 2021 (their main setting)
    "cb": {"beta": 0.9999, "base": "ce"},  # Cui et al. 2019
    "ldam": {"max_m": 0.5, "s": 30.0},  # Cao et al. 2019 (no deferred re-weighting), cosine head
    # LDAM-DRW, the paper's main setting: effective-number weights from 80 % of the epochs on
    # (its 160 of 200); it assumes a decaying LR (training.scheduler = "cosine").
    "ldam_drw": {"max_m": 0.5, "s": 30.0, "drw": True, "drw_start": 0.8},
    # The paper's reported ALPA (Loss v2), untuned: shows what the search added.
    "alpa_paper": {"alpha": 0.875, "beta": 1.625, "gamma_pos": 0.0, "gamma_neg": 4.0, "clip": 0.05},
}
_BUILD_NAME = {"alpa_paper": "alpa", "ldam_drw": "ldam"}


class CompareError(BadInput):
    """A bad best.json, loss list or seed count, or a best.json from another dataset."""


@dataclass(frozen=True)
class LossEntry:
    label: str  # column name: "alpa" (tuned), "ce", ...
    name: str  # build_loss name
    params: dict[str, Any]
    tuned: bool = False  # the winner of a search (best.json's, or a shootout study's best trial)
    study: str | None = None  # the study that tuned it


@dataclass(frozen=True)
class Job:
    loss: LossEntry
    seed: int


def without_class_counts(params: dict[str, Any]) -> dict[str, Any]:
    """A loss setting to train on a split: each run builds with that split's own class counts."""
    return {k: v for k, v in params.items() if k != "class_counts"}


def parse_losses(text: str) -> list[str]:
    """``ce,focal,asl,alpa`` -> labels, checked against the known ones (order kept, no repeats)."""
    return parse_names(text, [TUNED, *BASELINES], "--losses")


def parse_names(text: str, known: list[str], flag: str) -> list[str]:
    """A comma-separated list of names from ``known`` (order kept, no repeats), or one CompareError line."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise CompareError(f"{flag}: {', '.join(map(repr, unknown)) or 'empty'}: choose from {', '.join(known)}")
    if len(set(names)) != len(names):
        raise CompareError(f"{flag}: {text!r} names a loss twice")
    return names


def load_best(path: str | Path) -> dict[str, Any]:
    """The tuned record of a best.json (or any export format), as a CompareError when unusable."""
    from alpa_tune.records import ExportError

    try:
        return read_record(path)
    except ExportError as exc:
        raise CompareError(f"--best: {exc}") from None


def check_best(record: dict[str, Any], fingerprint: str, class_names: list[str], best_path: str | Path) -> None:
    """Refuse a best.json tuned on other data: its class count and dataset fingerprint must match."""
    names = record.get("metrics", {}).get("class_names")
    if names is not None and len(names) != len(class_names):
        raise CompareError(f"--best {best_path}: tuned on {len(names)} classes, but the config's dataset has "
                           f"{len(class_names)}")
    tuned_on = record.get("dataset_fingerprint")
    if tuned_on is not None and tuned_on != fingerprint:
        raise CompareError(f"--best {best_path}: tuned on dataset {tuned_on}, but the config's dataset is "
                           f"{fingerprint} (other data, image size or settings)")


def loss_entries(labels: list[str], record: dict[str, Any]) -> list[LossEntry]:
    """Labels -> what to build: the tuned loss from the record, baselines from BASELINES."""
    from alpa_tune.losses import build_for_counts

    entries = []
    for label in labels:
        if label == TUNED:
            entry = LossEntry(label, record["loss"], without_class_counts(record["params"]), tuned=True,
                              study=record.get("study"))
        else:
            entry = LossEntry(label, _BUILD_NAME.get(label, label), dict(BASELINES[label]))
        build_for_counts(entry.name, entry.params, [2, 1])  # a bad parameter fails now, not in a worker
        entries.append(entry)
    return entries


def plan_workers(n_jobs: int, requested: int | None, device: str) -> tuple[int, list[str]]:
    """(processes, device per process). CUDA: one process per visible GPU; CPU: one per core."""
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        gpus = [device] if ":" in device else [f"cuda:{k}" for k in range(max(torch.cuda.device_count(), 1))]
        workers = min(n_jobs, requested or len(gpus))
        return workers, [gpus[k % len(gpus)] for k in range(workers)]
    workers = min(n_jobs, requested or os.cpu_count() or 1)
    return workers, ["cpu"] * workers


def run_comparison(config: StudyConfig, record: dict[str, Any], labels: list[str], seeds: int, *,
                   workers: int | None = None, best_path: str | Path = "best.json",
                   on_run: Callable[[dict[str, Any], int, int], None] | None = None) -> dict[str, Any]:
    """``--best``: the tuned loss of an export against the baselines at their papers' settings.

    ``on_run(run, done, total)`` is called as each training finishes (any order).
    """
    from alpa_tune.data import load_dataset

    if seeds < 1:
        raise CompareError(f"--seeds: must be >= 1, got {seeds}")
    dataset = load_dataset(config.data)
    check_best(record, dataset.fingerprint, dataset.class_names, best_path)
    comparison = run_entries(config, loss_entries(labels, record), seeds, dataset=dataset, workers=workers,
                             on_run=on_run)
    comparison.update(study=record.get("study") or config.name, tuned_trial=record.get("trial"),
                      tuned_value=record.get("value"))
    return comparison


def run_entries(config: StudyConfig, entries: list[LossEntry], seeds: int, *, dataset: Any = None,
                workers: int | None = None, on_run: Callable[[dict[str, Any], int, int], None] | None = None,
                done: dict[tuple[str, int], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train every entry with every seed on the development split, score each on the hold-out.

    ``done`` holds runs already trained (a resumed shootout, keyed by label and seed): they are
    taken as they are and not trained again; ``on_run`` sees only the new ones.
    """
    from alpa_tune.data import load_dataset
    from alpa_tune.training import split_holdout

    if seeds < 1:
        raise CompareError(f"--seeds: must be >= 1, got {seeds}")
    dataset = dataset if dataset is not None else load_dataset(config.data)
    dev, held = split_holdout(dataset, config.training.holdout, config.training.seed)
    seed_list = [config.training.seed + k for k in range(seeds)]
    done = done or {}
    runs: list[dict[str, Any]] = [done[(e.label, seed)] for seed in seed_list for e in entries if (e.label, seed) in done]
    jobs = [Job(entry, seed) for seed in seed_list for entry in entries if (entry.label, seed) not in done]
    n_workers, devices = plan_workers(max(len(jobs), 1), workers, config.training.device)
    threads = config.training.threads or max(1, (os.cpu_count() or 1) // n_workers)

    new_runs: list[dict[str, Any]] = []

    def finished(run: dict[str, Any]) -> None:
        new_runs.append(run)
        if on_run:
            on_run(run, len(new_runs), len(jobs))

    if not jobs:
        pass
    elif n_workers == 1:
        import torch

        before = torch.get_num_threads()
        _init_worker(config.to_dict(), threads, devices[0], dataset)
        try:
            for job in jobs:
                finished(_train_one(job))
        finally:
            torch.set_num_threads(before)  # in-process: leave the caller's setting as it was
            _WORKER.clear()
    else:
        # spawn: a fresh interpreter per worker (no forked torch/CUDA state); each loads the
        # dataset once (file sources read the shared on-disk cache) and pins its own device.
        context = multiprocessing.get_context("spawn")
        slots = context.Queue()
        for device in devices:
            slots.put(device)
        with ProcessPoolExecutor(n_workers, mp_context=context, initializer=_init_worker_slot,
                                 initargs=(config.to_dict(), threads, slots)) as pool:
            futures = [pool.submit(_train_one, job) for job in jobs]
            try:
                for future in as_completed(futures):
                    finished(future.result())
            except BaseException:  # a failure or Ctrl-C: do not start the queued trainings
                for future in futures:
                    future.cancel()
                raise
    runs += new_runs
    order = {(entry.label, seed): k for k, (seed, entry) in
             enumerate((seed, entry) for seed in seed_list for entry in entries)}
    runs.sort(key=lambda run: order[(run["loss"], run["seed"])])
    results, verdict_line = held_out_statistics(entries, runs, dataset.labels[held])
    return {
        "format": 2,
        "results": results,
        "verdict": verdict_line,
        "statistics": STATISTICS,
        "study": config.name,
        "dataset_fingerprint": dataset.fingerprint,
        "class_names": list(dataset.class_names),
        "train_counts": np.bincount(dataset.labels[dev], minlength=dataset.num_classes).tolist(),
        "test_counts": np.bincount(dataset.labels[held], minlength=dataset.num_classes).tolist(),
        "losses": [{"label": e.label, "loss": e.name, "params": e.params, "tuned": e.tuned, "study": e.study}
                   for e in entries],
        "seeds": seed_list,
        "runs": runs,
        "reused_runs": len(runs) - len(new_runs),
        "training": {k: v for k, v in config.to_dict()["training"].items()
                     if k in ("epochs", "batch_size", "lr", "weight_decay", "holdout", "seed", "optimizer",
                              "scheduler", "warmup_epochs")},  # ldam_drw's result depends on the schedule
        "model": config.model.backbone,
        "workers": n_workers if jobs else 0,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


STATISTICS = ("paired, stratified, two-level bootstrap (alpa_tune.stats): 2000 replicates resample the seeds "
              "and, within each class, the held-out images, the same draws for every loss; 95 % percentile intervals")


def held_out_statistics(entries: list[LossEntry], runs: list[dict[str, Any]],
                        targets: np.ndarray) -> tuple[dict[str, dict[str, Any]], str]:
    """Per label: ``tuned``, ``study``, ``params``, ``balanced_accuracy`` {mean, ci95} and ``vs_best``
    {difference, ci95}, ``best``, ``distinguishable``; and the one-line verdict. A loss that
    diverged on some seed has no paired runs: it gets nulls and is named in the verdict."""
    from alpa_tune.stats import paired_bootstrap, verdict

    by_label = {entry.label: [r for r in runs if r["loss"] == entry.label] for entry in entries}
    complete = {label: [np.asarray(r["predictions"]) for r in label_runs]
                for label, label_runs in by_label.items() if label_runs and all("error" not in r for r in label_runs)}
    stats = {s.label: s for s in paired_bootstrap(targets, complete)} if complete else {}
    results = {}
    for entry in entries:
        s = stats.get(entry.label)
        results[entry.label] = {
            "tuned": entry.tuned,
            "study": entry.study,
            "loss": entry.name,
            "params": entry.params,
            "balanced_accuracy": None if s is None else {"mean": s.mean, "ci95": list(s.ci95)},
            "vs_best": None if s is None else {"difference": s.difference, "ci95": list(s.difference_ci95)},
            "best": bool(s and s.best),
            "distinguishable": None if s is None else s.distinguishable,
        }
    line = verdict(list(stats.values())) if stats else "No loss trained on every seed; nothing to compare."
    diverged = [label for label in by_label if label not in complete]
    if diverged and stats:
        line += f" Left out (diverged on some seed): {', '.join(diverged)}."
    return results, line


# -- worker processes ------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker_slot(config_dict: dict[str, Any], threads: int, slots: Any) -> None:
    _init_worker(config_dict, threads, slots.get())


def _init_worker(config_dict: dict[str, Any], threads: int, device: str, dataset: Any = None) -> None:
    import torch

    from alpa_tune.data import load_dataset
    from alpa_tune.training import resolve_device

    torch.set_num_threads(threads)  # two processes on two cores must not fight over them
    config = config_from_dict(config_dict)
    _WORKER.update(config=config, dataset=dataset if dataset is not None else load_dataset(config.data),
                   device=resolve_device(device))


def _train_one(job: Job) -> dict[str, Any]:
    from alpa_tune.losses import build_for_counts
    from alpa_tune.training import NonFiniteLossError, split_holdout, train_and_evaluate

    config, dataset, device = _WORKER["config"], _WORKER["dataset"], _WORKER["device"]
    dev, held = split_holdout(dataset, config.training.holdout, config.training.seed)
    entry = job.loss

    def factory(counts: np.ndarray):
        return build_for_counts(entry.name, entry.params, counts)

    started = time.perf_counter()
    run: dict[str, Any] = {"loss": entry.label, "seed": job.seed, "device": str(device),
                           "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")}
    try:
        result = train_and_evaluate(config, dataset, dev, held, factory, seed=job.seed, device=device)
    except NonFiniteLossError as exc:  # one diverging baseline must not sink the whole table
        return {**run, "error": str(exc), "seconds": round(time.perf_counter() - started, 2)}
    return {
        **run,
        "balanced_accuracy": result.balanced_accuracy,
        "macro_f1": result.macro_f1,
        "recall": [_finite_or_none(v) for v in result.recall],
        "f1": [_finite_or_none(v) for v in result.f1],
        "predictions": result.predictions,  # per held-out image: the paired statistics need them
        "seconds": round(time.perf_counter() - started, 2),
    }


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None  # JSON and study attrs have no NaN


# -- the study -------------------------------------------------------------------------------
def find_study(url: str, name: str):
    """The study ``name`` when the storage exists and holds it, else None (never creates a store)."""
    import optuna

    path = journal_or_sqlite_path(url)
    if path is not None and not path.exists():
        return None
    try:
        return optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        return None
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - a driver error reading the study list
        raise StorageError(f"cannot read studies in {mask_url(url)}: {type(exc).__name__}") from None


def store_comparison(study: Any, comparison: dict[str, Any]) -> None:
    """Keep the comparison with the study, where ``alpa-tune report`` finds it."""
    study.set_user_attr(COMPARISON_ATTR, comparison)


def check_output(prefix: str | Path) -> None:
    """Fail before hours of training when the CSV/Markdown cannot be written."""
    folder = Path(prefix).parent
    try:
        check_writable(folder)
    except OSError as exc:
        raise CompareError(f"-o {prefix}: cannot write in {folder} ({exc.strerror})") from None


def write_outputs(comparison: dict[str, Any], prefix: str | Path) -> list[Path]:
    """PREFIX.csv, PREFIX.md and PREFIX.json (every run, for later analysis)."""
    import json

    prefix = Path(prefix)
    outputs = {".csv": to_csv(comparison), ".md": to_markdown(comparison),
               ".json": json.dumps(comparison, indent=2, allow_nan=False) + "\n"}
    paths = []
    for suffix, text in outputs.items():
        path = prefix.with_name(prefix.name + suffix)
        try:
            write_atomically(path, text)
        except OSError as exc:
            raise CompareError(f"cannot write {path}: {exc.strerror}") from None
        paths.append(path)
    return paths
