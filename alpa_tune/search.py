"""The search: space, the paper's seed points, sampler and pruner, study creation, the objective.

Bridges an Optuna trial to :func:`alpa_tune.training.cross_validate`.
"""

from __future__ import annotations

import math
import os
import socket
import threading
from typing import Any

import numpy as np
import optuna

from alpa_tune.config import (
    MACHINE_LOCAL_KEYS,
    ConfigError,
    SearchConfig,
    SpaceConfig,
    StudyConfig,
    config_from_dict,
)
from alpa_tune.data import ImageDataset
from alpa_tune.storage import (
    DiskFullError,
    StorageLost,
    TrialTakenOver,
    count_trial_states,
    journal_or_sqlite_path,
    open_storage,
    read_study_attr,
    study_lock,
)
from alpa_tune.training import (
    EpochStats,
    FoldResult,
    NonFiniteLossError,
    cross_validate,
)

CONFIG_ATTR = "alpa_tune_config"
BUDGET_ATTR = "n_trials"
SEEDED_ATTR = "alpa_tune_seeded"
NEXT_RANK_ATTR = "alpa_tune_next_rank"
METRIC_NAME = "balanced_accuracy"

# The paper's three settings (section 6.1): Loss v1, v2 (the reported ALPA) and v3 (Hill).
PAPER_POINTS: tuple[dict[str, Any], ...] = (
    {"alpha": 1.0, "beta": 1.0, "gamma_pos": 0.0, "gamma_neg": 4.0, "variant": "alpa"},
    {"alpha": 0.875, "beta": 1.625, "gamma_pos": 0.0, "gamma_neg": 4.0, "variant": "alpa"},
    {"alpha": 1.25, "beta": 2.0, "gamma_pos": 3.0, "gamma_neg": 2.0, "variant": "alpa_hill"},
)
SPACE_PARAMS = ("alpha", "beta", "gamma_pos", "gamma_neg")


class StopRequested(Exception):
    """Raised inside a trial at an epoch boundary when the worker was asked to stop."""


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def suggest(trial: optuna.Trial, search: SearchConfig) -> dict[str, Any]:
    """Sample one point of the configured space (enqueued points come back unchanged)."""
    params = {name: trial.suggest_float(name, *getattr(search.space, name)) for name in SPACE_PARAMS}
    params["variant"] = trial.suggest_categorical("variant", list(search.variants))
    return params


def loss_spec(params: dict[str, Any], space: SpaceConfig) -> tuple[str, dict[str, Any]]:
    """Trial params -> ``(loss name, build_loss kwargs)``: the one mapping export and training share."""
    kwargs = {name: float(params[name]) for name in SPACE_PARAMS}
    kwargs.update(clip=space.clip, focusing=space.focusing,
                  variant="hill" if params.get("variant") == "alpa_hill" else "plain")
    if kwargs["variant"] == "hill":
        kwargs["hill_lambda"] = space.hill_lambda
    return "alpa", kwargs


def paper_points(search: SearchConfig) -> list[dict[str, Any]]:
    """The paper's settings that lie inside the configured space and variants."""
    inside = []
    for point in PAPER_POINTS:
        if point["variant"] not in search.variants:
            continue
        if all(getattr(search.space, n)[0] <= point[n] <= getattr(search.space, n)[1] for n in SPACE_PARAMS):
            inside.append(point)
    return inside


def make_sampler(search: SearchConfig, rank: int = 0) -> optuna.samplers.BaseSampler:
    """Each worker gets seed + rank, or parallel workers would propose the same startup trials."""
    seed = search.seed + rank
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True)
    if search.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=search.n_startup_trials)
    # constant_liar: running trials count as "bad" so parallel workers spread out.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=search.n_startup_trials, constant_liar=True,
                                      multivariate=True)


def make_pruner(config: StudyConfig) -> optuna.pruners.BasePruner:
    search, t = config.search, config.training
    steps = t.folds if search.report == "fold" else t.folds * t.epochs
    if search.pruner == "none":
        return optuna.pruners.NopPruner()
    if search.pruner == "median":
        # Judge a trial only after its first report step (a fold, or the first fold's epochs).
        warmup = 1 if search.report == "fold" else t.epochs
        return optuna.pruners.MedianPruner(n_startup_trials=search.n_startup_trials, n_warmup_steps=warmup)
    if search.pruner == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=max(1, steps // 2))
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)


def create_study(config: StudyConfig, storage_url: str, budget: int | None = None, *,
                 lower_budget: bool = False) -> optuna.Study:
    """Create (or load) the study, store its config and enqueue the paper's points exactly once.

    An existing study must have been created with the same settings (``check_study``), and its
    budget changes only as ``check_study`` allows. Safe to call from many processes at once: the
    schema is created under a lock (storage.open_storage) and seeding under the study's lock.
    """
    storage = open_storage(storage_url)
    with study_lock(storage_url, config.name):
        study = optuna.create_study(study_name=config.name, storage=storage, direction="maximize",
                                    load_if_exists=True)
        attrs = study.user_attrs
        if CONFIG_ATTR not in attrs:
            study.set_user_attr(CONFIG_ATTR, config.to_dict())
            study.set_metric_names([METRIC_NAME])
            from alpa_tune.dashboard import save_study_note  # the config as the dashboard's study note

            save_study_note(study, config)
        else:
            check_study(study, config, budget, lower_budget=lower_budget)
        if budget is not None or BUDGET_ATTR not in attrs:
            study.set_user_attr(BUDGET_ATTR, budget if budget is not None else config.search.n_trials)
        if not attrs.get(SEEDED_ATTR):
            if config.search.enqueue_paper_points:
                for point in paper_points(config.search):
                    study.enqueue_trial(point, user_attrs={"seed_point": "paper"})
            study.set_user_attr(SEEDED_ATTR, True)
    return study


def check_existing_study(config: StudyConfig, storage_url: str, budget: int | None = None, *,
                         lower_budget: bool = False) -> None:
    """Before any work: refuse settings that differ from an existing study's, or a budget change
    it does not allow. Nothing is created: a missing storage file or study passes."""
    path = journal_or_sqlite_path(storage_url)
    if path is not None and not path.exists():
        return
    try:
        study = optuna.load_study(study_name=config.name, storage=open_storage(storage_url))
    except KeyError:
        return
    if CONFIG_ATTR in study.user_attrs:
        check_study(study, config, budget, lower_budget=lower_budget)


def check_study(study: optuna.Study, config: StudyConfig, budget: int | None, *, lower_budget: bool) -> None:
    """The given config must equal the stored one (machine-local keys and the budget aside), and
    ``budget`` may not go below the finished trials, nor below the stored budget unless asked."""
    drift = config_drift(stored_config(study), config)
    if drift:
        shown = "\n".join(f"  {line}" for line in drift[:5])
        more = f"\n  ... and {len(drift) - 5} more" if len(drift) > 5 else ""
        raise ConfigError(
            f"study {study.study_name!r} was created with other settings; every trial of a study trains the "
            f"same way:\n{shown}{more}\nrevert them, or start a new study under another name "
            f"(--set name=NEW_NAME)")
    if budget is None:
        return
    counts = count_trial_states(study._storage, study._study_id)
    done = counts[optuna.trial.TrialState.COMPLETE] + counts[optuna.trial.TrialState.PRUNED]
    if budget < done:
        raise ConfigError(f"--trials {budget}: study {study.study_name!r} already has {done} finished trials; "
                          "nothing was changed (a budget counts finished trials, so it cannot go below that)")
    stored = study_budget(study)
    if budget < stored and not lower_budget:
        raise ConfigError(f"--trials {budget} is below study {study.study_name!r}'s budget of {stored}; nothing "
                          f"was changed. To lower it (running workers stop at the new budget), add --lower-budget")


NOT_DRIFT = MACHINE_LOCAL_KEYS | {"search.n_trials"}  # where each machine's data lives; the budget


def config_drift(stored: StudyConfig, given: StudyConfig) -> list[str]:
    """``"training.lr: stored 0.003, given 0.5"`` for every key that differs, machine-local keys aside."""
    old, new = _flat(stored.to_dict()), _flat(given.to_dict())
    return [f"{key}: stored {old.get(key)!r}, given {new.get(key)!r}"
            for key in sorted(old.keys() | new.keys()) if key not in NOT_DRIFT and old.get(key) != new.get(key)]


def _flat(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def stored_config(study: optuna.Study) -> StudyConfig:
    """The config every worker of this study trains with."""
    raw = study.user_attrs.get(CONFIG_ATTR)
    if raw is None:
        raise ConfigError(f"study {study.study_name!r} was not created by alpa-tune (it has no stored config)")
    return config_from_dict(raw)


def ranked_complete_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed trials with a finite value, best first (ties: the earlier trial)."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value)]
    return sorted(complete, key=lambda t: (-t.value, t.number))


def allocate_rank(study: optuna.Study, url: str, explicit: int | None = None) -> int:
    """This worker's rank (its sampler seed is ``search.seed + rank``), unique in the study.

    Without an explicit rank the next free one is taken from the study under its lock, so two
    launchers, a resumed run or compose replicas never share a seed (which would train the same
    startup points twice). An explicit rank wins and moves the next free one past it.
    """
    with study_lock(url, study.study_name):
        next_free = int(study.user_attrs.get(NEXT_RANK_ATTR, 0))
        rank = next_free if explicit is None else explicit
        if rank + 1 > next_free:
            study.set_user_attr(NEXT_RANK_ATTR, rank + 1)
    return rank


def study_budget(study: optuna.Study, connection: Any = None) -> int:
    """The study's budget; ``connection`` (the study lock's, PostgreSQL) reads it in one query."""
    stored = read_study_attr(study._storage, study._study_id, BUDGET_ATTR, connection)
    return int(stored) if stored is not None else stored_config(study).search.n_trials


class Objective:
    """One trial: sample, build the loss, cross-validate, report per fold, record metrics."""

    def __init__(self, config: StudyConfig, dataset: ImageDataset, *, device: Any = None,
                 stop_event: threading.Event | None = None) -> None:
        from alpa_tune.losses import build_loss

        self._build_loss = build_loss
        self.config = config
        self.dataset = dataset
        self.device = device
        self.stop_event = stop_event or threading.Event()

    def __call__(self, trial: optuna.Trial) -> float:
        config = self.config
        trial.set_user_attr("worker", worker_id())  # first: a trial whose worker dies is then traceable
        params = suggest(trial, config.search)
        name, kwargs = loss_spec(params, config.search.space)
        if os.environ.get("SLURM_ARRAY_TASK_ID"):  # which array task ran it, as squeue and scancel name it
            trial.set_user_attr("slurm_task", f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}")
        trial.set_user_attr("loss", {"name": name, "params": kwargs})
        by_epoch = config.search.report == "epoch"
        wilcoxon = config.search.pruner == "wilcoxon"

        def on_epoch(stats: EpochStats) -> None:
            if by_epoch and stats.balanced_accuracy is not None:
                trial.report(stats.balanced_accuracy, step=stats.fold * config.training.epochs + stats.epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at fold {stats.fold}, epoch {stats.epoch}")
            trial.set_user_attr("progress", f"fold {stats.fold + 1}/{config.training.folds}, "
                                            f"epoch {stats.epoch + 1}/{config.training.epochs}")
            if self.stop_event.is_set():
                raise StopRequested(f"worker stopping after fold {stats.fold}, epoch {stats.epoch}")

        def on_fold(result: FoldResult, done: list[FoldResult]) -> None:
            record_folds(trial, done, self.dataset)
            if not by_epoch:
                # Wilcoxon compares paired per-fold scores; the others judge the running mean.
                score = result.balanced_accuracy if wilcoxon else float(np.mean([f.balanced_accuracy for f in done]))
                trial.report(score, step=result.fold)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after fold {result.fold}")

        try:
            result = cross_validate(config, self.dataset, lambda counts: self._build_loss(name, **kwargs),
                                    on_epoch=on_epoch, on_fold=on_fold, evaluate_each_epoch=by_epoch,
                                    device=self.device)
        except (optuna.TrialPruned, StorageLost, DiskFullError, TrialTakenOver):
            raise
        except StopRequested as exc:
            trial.set_user_attr("fail_reason", f"interrupted ({exc}); queued again")
            raise
        except Exception as exc:
            # The reason travels with the FAIL state so the dashboard and `study show` explain it.
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
            raise
        value = result.mean_balanced_accuracy
        if not math.isfinite(value):
            trial.set_user_attr("fail_reason", "balanced accuracy is not finite")
            raise NonFiniteLossError("balanced accuracy is not finite")
        return value


def record_folds(trial: optuna.Trial, folds: list[FoldResult], dataset: ImageDataset) -> None:
    """Per-fold and per-class figures as user attributes (the dashboard shows them; pruned trials keep them)."""
    trial.set_user_attr("fold_balanced_accuracy", [round(f.balanced_accuracy, 6) for f in folds])
    trial.set_user_attr("fold_macro_f1", [round(f.macro_f1, 6) for f in folds])
    trial.set_user_attr("class_names", list(dataset.class_names))
    trial.set_user_attr("class_recall", _mean_per_class([f.recall for f in folds]))
    trial.set_user_attr("class_f1", _mean_per_class([f.f1 for f in folds]))
    trial.set_user_attr("epoch_seconds", round(float(np.mean([f.epoch_seconds for f in folds])), 4))
    trial.set_user_attr("images_per_second", round(float(np.mean([f.images_per_second for f in folds])), 2))
    trial.set_user_attr("device", folds[-1].device)
    trial.set_user_attr("dataset_fingerprint", dataset.fingerprint)


def _mean_per_class(rows: list[list[float]]) -> list[float | None]:
    """Mean over folds per class; None where a class never appeared in a validation fold."""
    matrix = np.array(rows, dtype=np.float64)
    seen = np.isfinite(matrix)
    sums = np.where(seen, matrix, 0.0).sum(axis=0)
    counts = seen.sum(axis=0)
    return [round(float(s / n), 6) if n else None for s, n in zip(sums, counts)]
