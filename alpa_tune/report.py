"""One self-contained HTML report of a study: what the search found, readable offline.

plotly.js is embedded once, inline (no CDN, no fonts, no external requests), so the file
can be mailed or archived and still open years later without a network.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from alpa_tune import __version__
from alpa_tune.errors import BadInput
from alpa_tune.files import write_atomically
from alpa_tune.study import param_names, ranked_complete_trials

# Below this, importance estimates are noise (with one trial optuna splits them evenly).
MIN_IMPORTANCE_TRIALS = 5
_PLOT_CONFIG = {"displaylogo": False, "responsive": True}  # no plotly.com link in the mode bar


class ReportError(BadInput):
    """Nothing to report yet, or the report cannot be written."""


def build_report(study: optuna.Study) -> str:
    """The report's HTML text. Needs at least one completed trial."""
    trials = study.get_trials(deepcopy=False)
    complete = ranked_complete_trials(study)  # best first
    if not complete:
        raise ReportError(f"study {study.study_name!r} has no completed trial yet; nothing to report")
    best = complete[0]
    page = _Page()
    page.section("Optimisation history", "Each completed trial's mean fold balanced accuracy, and the best so far.",
                 lambda: _optuna_plot("plot_optimization_history", study, target_name="balanced accuracy"))
    page.section("Parameter importances", "How much of the variation in balanced accuracy each parameter explains "
                 "(optuna.importance, PED-ANOVA).", lambda: _importances(study, len(complete)))
    page.section("Parallel coordinates", "Every completed trial as a line through its parameters and value.",
                 lambda: _optuna_plot("plot_parallel_coordinate", study, target_name="balanced accuracy"))
    # Numeric parameters of whatever loss the study tunes (ALPA: alpha, beta, gamma_pos, gamma_neg).
    sliced = [p for p in param_names(complete) if any(isinstance(t.params.get(p), float) for t in complete)]
    page.section("Slice plots", "Balanced accuracy against each tuned parameter.",
                 lambda: _optuna_plot("plot_slice", study, params=sliced, target_name="balanced accuracy"))
    page.section("Trial states over time", "When each trial started and finished, coloured by its final state.",
                 lambda: _optuna_plot("plot_timeline", study))
    page.section(f"Best trial {best.number}: per-class recall and F1",
                 "Mean over the validation folds (a class absent from every fold has no bar).",
                 lambda: _per_class(best))
    comparison = study.user_attrs.get("comparison")
    if comparison:
        page.section("Held-out comparison", "Every loss trained on the same development split with the same "
                     "seeds, scored on the held-out split the search never saw.", lambda: _comparison(comparison))
    return page.render(_header(study, trials, complete, best), study.study_name)


def write_report(study: optuna.Study, path: str | Path) -> Path:
    """Build the report and write it (atomically) to ``path``."""
    path = Path(path)
    text = build_report(study)
    try:
        write_atomically(path, text)
    except OSError as exc:
        raise ReportError(f"cannot write {path}: {exc.strerror}") from None
    return path


class _Page:
    """Sections of HTML; the first figure carries plotly.js inline, the others reuse it."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.plotly_included = False
        self.figures = 0

    def figure(self, fig: Any) -> str:
        import plotly.io as pio

        fig.update_layout(template="plotly_white", margin={"t": 50, "b": 50})
        text = pio.to_html(fig, full_html=False, include_plotlyjs=not self.plotly_included, config=_PLOT_CONFIG,
                           default_height="460px")
        self.plotly_included = True
        self.figures += 1
        return text

    def section(self, title: str, caption: str, make: Callable[[], Any]) -> None:
        try:
            content = make()
        except Exception as exc:  # noqa: BLE001 - one plot that cannot draw must not lose the whole report
            content = _Note(f"could not draw this plot: {type(exc).__name__}: {exc}")
        body = []
        for item in content if isinstance(content, list) else [content]:
            if isinstance(item, _Note):
                body.append(f'<p class="note">{html.escape(item.text)}</p>')
            elif isinstance(item, str):
                body.append(item)  # already HTML
            else:
                body.append(self.figure(item))
        self.parts.append(f"<section><h2>{html.escape(title)}</h2><p class=\"caption\">{html.escape(caption)}</p>"
                          + "\n".join(body) + "</section>")

    def render(self, header: str, name: str) -> str:
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>alpa-tune report: {html.escape(name)}</title><style>{_CSS}</style></head>"
            f"<body><main>{header}{''.join(self.parts)}</main></body></html>\n"
        )


class _Note:
    def __init__(self, text: str) -> None:
        self.text = text


def _optuna_plot(name: str, study: optuna.Study, **kwargs: Any) -> Any:
    import optuna.visualization as vis

    return getattr(vis, name)(study, **kwargs)


def _importances(study: optuna.Study, n_complete: int) -> Any:
    if n_complete < MIN_IMPORTANCE_TRIALS:
        return _Note(f"Parameter importances need at least {MIN_IMPORTANCE_TRIALS} completed trials; this study has "
                     f"{n_complete}. Run more trials (alpa-tune run CONFIG --trials N) and report again.")
    try:
        return _optuna_plot("plot_param_importances", study, target_name="balanced accuracy")
    except (RuntimeError, ValueError) as exc:  # e.g. every trial has the same parameter values
        return _Note(f"Parameter importances could not be estimated: {exc}")


def _per_class(trial: FrozenTrial) -> Any:
    import plotly.graph_objects as go

    attrs = trial.user_attrs
    if "class_recall" not in attrs:
        return _Note("This trial has no per-class metrics.")
    names = attrs.get("class_names") or [str(k) for k in range(len(attrs["class_recall"]))]
    fig = go.Figure([go.Bar(name="recall", x=names, y=attrs["class_recall"]),
                     go.Bar(name="F1", x=names, y=attrs.get("class_f1", []))])
    fig.update_layout(barmode="group", yaxis={"range": [0, 1], "title": "mean over folds"},
                      xaxis={"title": "class", "type": "category"}, title=f"Trial {trial.number}")
    return fig


def _comparison(comparison: dict[str, Any]) -> list[Any]:
    import plotly.graph_objects as go

    from alpa_tune.compare_table import table

    t = table(comparison)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    rows = []
    for name, train, test, cells in t.rows:
        texts = [f"<b>{html.escape(c.text())}</b>" if c.best else html.escape(c.text()) for c in cells]
        rows.append("<tr>" + "".join(f"<td>{v}</td>" for v in [html.escape(name), train, test, *texts]) + "</tr>")
    table_html = (f'<table class="compare"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
                  f'<p class="caption">{html.escape(t.note)}</p>')
    summary = t.rows[-1][3]
    fig = go.Figure()
    for offset, metric in ((0, "balanced accuracy"), (1, "macro F1")):
        cells = summary[offset::2]
        fig.add_bar(name=metric, x=t.labels, y=[c.mean for c in cells],
                    error_y={"type": "data", "array": [c.std or 0.0 for c in cells], "visible": True})
    fig.update_layout(barmode="group", yaxis={"range": [0, 1]}, title="Held-out balanced accuracy and macro F1 "
                      "(mean ± std over seeds)")
    return [table_html, fig]


def _header(study: optuna.Study, trials: list[FrozenTrial], complete: list[FrozenTrial], best: FrozenTrial) -> str:
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    states = ", ".join(f"{n} {s.name.lower()}" for s, n in counts.items() if n)
    params = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in best.params.items())
    folds = best.user_attrs.get("fold_balanced_accuracy")
    rows = [("Trials", f"{len(trials)} ({states})"),
            ("Best", f"trial {best.number}: mean fold balanced accuracy {best.value:.4f}"
                     + (f" (folds: {', '.join(f'{v:.3f}' for v in folds)})" if folds else "")),
            ("Best parameters", params)]
    for key, label in (("device", "Device"), ("dataset_fingerprint", "Dataset fingerprint")):
        if key in best.user_attrs:
            rows.append((label, str(best.user_attrs[key])))
    rows.append(("Generated", f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by alpa-tune {__version__}"))
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return (f"<h1>alpa-tune report: {html.escape(study.study_name)}</h1><table class=\"facts\">{facts}</table>"
            + _top_trials(complete) + _config_block(study))


def _top_trials(ranked_complete: list[FrozenTrial], limit: int = 10) -> str:
    ranked = ranked_complete[:limit]
    names = param_names(ranked)

    def shown(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    head = "".join(f"<th>{h}</th>" for h in ("trial", "balanced accuracy", *names))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in (
        str(t.number), f"{t.value:.4f}", *(shown(t.params.get(p, "-")) for p in names))) + "</tr>" for t in ranked)
    return (f"<h2>Top {len(ranked)} trials</h2>"
            f"<table class=\"trials\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _config_block(study: optuna.Study) -> str:
    from alpa_tune.config import to_toml
    from alpa_tune.study import CONFIG_ATTR

    raw = study.user_attrs.get(CONFIG_ATTR)
    if not raw:
        return ""
    return f"<details><summary>Study config</summary><pre>{html.escape(to_toml(raw))}</pre></details>"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0; background: #fafafa; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5rem; }
section { background: #fff; border: 1px solid #e4e4e4; border-radius: 6px; padding: 1rem; margin: 1.2rem 0; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 0; }
.caption { color: #666; font-size: 0.9rem; } .note { background: #fff8e1; padding: 0.6rem; border-radius: 4px; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 0.5rem 0; }
th, td { border-bottom: 1px solid #eee; padding: 0.25rem 0.6rem; text-align: left; }
table.compare td, table.trials td { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.compare td:first-child { text-align: left; }
pre { background: #f4f4f4; padding: 0.8rem; overflow-x: auto; }
"""
