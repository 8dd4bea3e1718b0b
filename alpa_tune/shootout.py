"""A fair shootout: every loss tuned with the same budget, then compared on the held-out split.

One study per loss in the same storage, named ``NAME-LOSS``, each with the config's data, folds,
split seeds, backbone and epochs and the same trial budget (a loss that declares no parameters,
CE or BCE, needs one trial: every trial would train the same). The winner of every study goes
through :func:`alpa_tune.compare.run_entries`, with the untuned paper defaults as extra columns
when asked. Each held-out training is stored with its study as soon as it ends (the
``holdout_runs`` user attribute, keyed by label, seed and what it trained), so a rerun after a
crash trains neither a finished study nor a finished held-out run again.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna

from alpa_tune.compare import CompareError, LossEntry, parse_names, without_class_counts
from alpa_tune.config import StudyConfig
from alpa_tune.search import declared_space
from alpa_tune.study import ranked_complete_trials

HOLDOUT_RUNS_ATTR = "holdout_runs"


def tuned_losses(text: str) -> list[str]:
    """``--tune ce,focal,alpa`` -> registered loss names (order kept, no repeats)."""
    from alpa_tune.losses import available_losses

    return parse_names(text, available_losses(), "--tune")


def study_config(config: StudyConfig, loss: str, trials: int) -> StudyConfig:
    """The config of ``loss``'s study: the shared settings, its own name, loss and budget.

    ALPA keeps the config's own space; another loss searches its whole declared space.
    """
    overrides = [f'name="{config.name}-{loss}"', f'search.loss="{loss}"']
    if loss != "alpa":
        overrides.append("search.space={}")
    tuned = config.replace(overrides)
    budget = trials if loss == "alpa" or declared_space(tuned.search)[0] else 1
    return tuned.replace([f"search.n_trials={budget}"])


def winner(study: optuna.Study, label: str) -> LossEntry:
    """The study's best trial as a held-out entry: the loss setting its trial recorded."""
    ranked = ranked_complete_trials(study)
    if not ranked:
        raise CompareError(f"study {study.study_name!r} has no completed trial: nothing to compare")
    recorded = ranked[0].user_attrs["loss"]
    return LossEntry(label, recorded["name"], without_class_counts(recorded["params"]), tuned=True,
                     study=study.study_name)


def paper_entry(loss: str) -> LossEntry | None:
    """``LOSS_paper``: the loss at its paper's default, untuned; None for a loss with no parameters."""
    from alpa_tune.losses import loss_paper_setting, loss_search_space

    if not loss_search_space(loss):
        return None
    return LossEntry(f"{loss}_paper", loss, without_class_counts(loss_paper_setting(loss)))


def run_key(entry: LossEntry, seed: int, config: StudyConfig, fingerprint: str) -> str:
    """What a held-out run depends on: reuse a stored run only when all of it is the same."""
    basis = {"loss": entry.name, "params": entry.params, "training": config.to_dict()["training"],
             "model": config.to_dict()["model"], "data": fingerprint}
    digest = hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{entry.label}|{seed}|{digest}"


def stored_runs(studies: dict[str, optuna.Study], entries: list[LossEntry], seeds: list[int],
                config: StudyConfig, fingerprint: str) -> dict[tuple[str, int], dict[str, Any]]:
    """Held-out runs a previous shootout stored, for the entries and seeds asked now."""
    done = {}
    for entry in entries:
        kept = studies[entry.label].user_attrs.get(HOLDOUT_RUNS_ATTR, {})
        for seed in seeds:
            run = kept.get(run_key(entry, seed, config, fingerprint))
            if run is not None:
                done[(entry.label, seed)] = run
    return done


def store_run(study: optuna.Study, entry: LossEntry, run: dict[str, Any], config: StudyConfig,
              fingerprint: str) -> None:
    """Keep one finished held-out run with its study (read, add, write: one shootout at a time)."""
    kept = dict(study.user_attrs.get(HOLDOUT_RUNS_ATTR, {}))
    kept[run_key(entry, run["seed"], config, fingerprint)] = run
    study.set_user_attr(HOLDOUT_RUNS_ATTR, kept)
