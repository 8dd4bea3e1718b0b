"""Renderings of a study and of the launcher's workers (presentation only): rich tables for a
terminal, Markdown and plain lines for a pipe or log, both from the same rows."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from alpa_tune.markdown import markdown_table
from alpa_tune.storage import storage_errors
from alpa_tune.study import finished, param_names, ranked_complete_trials, study_budget, trial_counts

if TYPE_CHECKING:
    from rich.table import Table


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
    from rich.table import Table  # here, not at the top: a piped `study show` never needs rich
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


def trial_rows(study: optuna.Study, limit: int = 20) -> tuple[list[str], list[list[str]]]:
    """(header, rows): the best ``limit`` trials with their params (whatever loss the study tunes),
    states, workers and notes, notes whole."""
    trials = study.get_trials(deepcopy=False)
    trials.sort(key=lambda t: (t.value is None, -(t.value or 0.0), t.number))
    shown = trials[:limit]
    names = param_names(shown)
    rows = []
    for t in shown:
        # A queued trial keeps its params in "fixed_params" until a worker picks it up.
        p = t.params or t.system_attrs.get("fixed_params", {})
        rows.append([
            str(t.number), t.state.name, "-" if t.value is None else f"{t.value:.4f}",
            *(_param_text(p[k]) if k in p else "-" for k in names),
            str(t.user_attrs.get("worker", "-")), str(t.user_attrs.get("fail_reason", "")),
        ])
    return ["trial", "state", "value", *names, "worker", "note"], rows


def _param_text(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def trials_table(study: optuna.Study, limit: int = 20) -> Table:
    """:func:`trial_rows` for the terminal (a long note cut to keep the table on screen)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=study_line(study), title_justify="left")
    header, rows = trial_rows(study, limit)
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row[:-1], Text(row[-1][:60]))
    return table


def trials_markdown(study: optuna.Study, limit: int = 20) -> str:
    """:func:`trial_rows` for a pipe or log: the progress line, then a Markdown table, nothing cut."""
    header, rows = trial_rows(study, limit)
    right = [column not in ("state", "worker", "note") and not all(not _is_number(r[k]) for r in rows)
             for k, column in enumerate(header)]
    return f"{study_line(study)}\n\n{markdown_table(header, rows, right)}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class ProgressLines:
    """The launcher's view for a pipe or log: a line each time the study's progress or a worker's
    state changes. A Live table there cannot redraw in place; it would repeat, cut to 80 columns."""

    def __init__(self, study_name: str, write: Callable[[str], None]) -> None:
        self._study_name = study_name
        self._write = write
        self._seen: dict[str, str] = {}

    def __call__(self, study: optuna.Study, slots: list) -> None:
        try:
            lines = {"study": study_line(study)}
        except storage_errors():
            lines = {"study": f"{self._study_name}: storage unreachable; workers wait for it"}
        lines.update({f"worker {slot.index}": f"worker {slot.index}: {slot.state}" for slot in slots})
        for key, line in lines.items():
            if self._seen.get(key) != line:
                self._write(line)
                self._seen[key] = line
