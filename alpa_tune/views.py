"""Rich renderings of a study and of the launcher's workers (presentation only)."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState
from rich.table import Table
from rich.text import Text

from alpa_tune.study import finished, ranked_complete_trials, study_budget, trial_counts
from alpa_tune.storage import storage_errors


def study_line(study: optuna.Study) -> str:
    counts = trial_counts(study)
    done = finished(counts)
    line = (f"{study.study_name}: {done}/{study_budget(study)} finished "
            f"({counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned), "
            f"{counts[TrialState.FAIL]} failed, {counts[TrialState.RUNNING]} running")
    best = best_trial(study)
    if best is not None:
        line += f", best {best.value:.4f} (trial {best.number})"
    return line


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    ranked = ranked_complete_trials(study)
    return ranked[0] if ranked else None


def workers_table(study: optuna.Study, slots: list) -> Table:
    """One row per launcher slot: pid, device, state and the trial it is running.

    While the storage is unreachable the title says so and the rows show the processes only.
    """
    try:
        running = {t.user_attrs.get("worker", ""): t
                   for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        title = study_line(study)
    except storage_errors() as exc:
        running, title = {}, f"{study.study_name}: storage unreachable ({type(exc).__name__}); workers wait for it"
    table = Table(title=title, title_justify="left", expand=False)
    for column in ("worker", "pid", "device", "state", "trial"):
        table.add_column(column)
    for slot in slots:
        pid = slot.process.pid if slot.process else None
        trial = next((t for key, t in running.items() if pid and key.endswith(f":{pid}")), None)
        doing = f"#{trial.number} {trial.user_attrs.get('progress', 'starting')}" if trial else "-"
        table.add_row(str(slot.index), str(pid or "-"), slot.device, slot.state, doing)
    return table


def trials_table(study: optuna.Study, limit: int = 20) -> Table:
    """The best ``limit`` trials, then their params and states."""
    table = Table(title=study_line(study), title_justify="left")
    for column in ("trial", "state", "value", "variant", "alpha", "beta", "gamma_pos", "gamma_neg", "worker", "note"):
        table.add_column(column)
    trials = study.get_trials(deepcopy=False)
    trials.sort(key=lambda t: (t.value is None, -(t.value or 0.0), t.number))
    for t in trials[:limit]:
        # A queued trial keeps its params in "fixed_params" until a worker picks it up.
        p = t.params or t.system_attrs.get("fixed_params", {})
        table.add_row(
            str(t.number), t.state.name, "-" if t.value is None else f"{t.value:.4f}", str(p.get("variant", "-")),
            *(f"{p[k]:.3f}" if k in p else "-" for k in ("alpha", "beta", "gamma_pos", "gamma_neg")),
            str(t.user_attrs.get("worker", "-")), Text(str(t.user_attrs.get("fail_reason", ""))[:60]),
        )
    return table
