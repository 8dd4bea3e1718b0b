"""A study's record, in one place: create and load it, its stored config and the drift check,
its budget, seeding, rank allocation, trial counts and ranking.

Torch-, scikit-learn- and timm-free: ``study list/show``, ``export``, ``report`` and the
dashboard read studies through this module at the speed of Optuna's own CLI.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from alpa_tune.config import MACHINE_LOCAL_KEYS, ConfigError, StudyConfig, config_from_dict
from alpa_tune.dashboard import save_study_note
from alpa_tune.errors import BadInput
from alpa_tune.search import paper_points
from alpa_tune.storage import (
    count_trial_states,
    journal_or_sqlite_path,
    mask_url,
    open_storage,
    read_study_attr,
    storage_errors,
    study_lock,
)

CONFIG_ATTR = "alpa_tune_config"
BUDGET_ATTR = "n_trials"
SEEDED_ATTR = "alpa_tune_seeded"
NEXT_RANK_ATTR = "alpa_tune_next_rank"
METRIC_NAME = "balanced_accuracy"


class StudyNotFound(BadInput):
    """No study of that name in the storage."""


def load_study(name: str, url: str, **kwargs: Any) -> optuna.Study:
    storage = kwargs.pop("storage", None) or open_storage(url, read_only=kwargs.pop("read_only", False))
    try:
        return optuna.load_study(study_name=name, storage=storage, **kwargs)
    except KeyError:
        raise StudyNotFound(f"study {name!r} does not exist in storage {mask_url(url)}") from None


def backend(study: optuna.Study) -> BaseStorage:
    """The storage a loaded study reads from (Optuna has no public accessor; one place uses it)."""
    return study._storage


def trial_counts(study: optuna.Study, connection: Any = None) -> dict[TrialState, int]:
    """Trials per state, in one query on an RDB."""
    return count_trial_states(backend(study), study._study_id, connection)


def finished(counts: dict[TrialState, int]) -> int:
    return counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]


def budget_met(study: optuna.Study) -> bool | None:
    """Whether the study has its finished trials; None while the storage cannot say."""
    try:
        return finished(trial_counts(study)) >= study_budget(study)
    except storage_errors():
        return None


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
    done = finished(trial_counts(study))
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
    stored = read_study_attr(backend(study), study._study_id, BUDGET_ATTR, connection)
    return int(stored) if stored is not None else stored_config(study).search.n_trials


# ALPA's trial parameters first, in the paper's order; another loss's follow as first sampled.
_ALPA_PARAM_ORDER = ("variant", "alpha", "beta", "gamma_pos", "gamma_neg")


def param_names(trials: list[optuna.trial.FrozenTrial]) -> list[str]:
    """The trial parameters the given trials hold (queued ones: their fixed params), for tables
    that show any loss's search: ALPA's in the paper's order, then others as first seen."""
    seen: dict[str, None] = {}
    for trial in trials:
        for name in trial.params or trial.system_attrs.get("fixed_params", {}):
            seen.setdefault(name)
    return [n for n in _ALPA_PARAM_ORDER if n in seen] + [n for n in seen if n not in _ALPA_PARAM_ORDER]

