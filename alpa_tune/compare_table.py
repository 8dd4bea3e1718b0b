"""The comparison laid out as the paper's Table 3: for the terminal, Markdown, CSV and the report.

Rendering only: it reads the JSON-ready dict that ``compare.run_comparison`` returns (or that a
study keeps) and imports no torch, scikit-learn or timm, so the report and a table reprint stay
light.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from alpa_tune.markdown import markdown_table

if TYPE_CHECKING:
    from rich.table import Table as RichTable


@dataclass(frozen=True)
class Cell:
    mean: float | None  # None: no finite value over the seeds
    std: float | None  # sample standard deviation over seeds; None with one seed
    percent: bool  # accuracies in %, as the paper; F1 as 0..1
    best: bool = False

    def text(self) -> str:
        if self.mean is None:
            return "-"
        scale, digits = (100.0, 2) if self.percent else (1.0, 3)
        body = f"{self.mean * scale:.{digits}f}"
        return body if self.std is None else f"{body} ± {self.std * scale:.{digits}f}"


@dataclass(frozen=True)
class Table:
    labels: list[str]  # losses, in column order
    header: list[str]  # "Class", "Training samples", "Test samples", then Acc/F1 per loss
    rows: list[tuple[str, int | None, int | None, list[Cell]]]  # class, train n, test n, 2 cells per loss
    note: str


def _stats(values: list[float | None]) -> tuple[float | None, float | None]:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else None)


def title(comparison: dict[str, Any]) -> str:
    return f"{comparison['study']}: held-out comparison"


def table(comparison: dict[str, Any]) -> Table:
    """The paper's Table 3: per class training samples, Acc (= recall) and F1 per loss, then
    balanced accuracy and macro F1; mean ± sample std over seeds. Best mean per row flagged."""
    labels = [loss["label"] for loss in comparison["losses"]]
    by_loss = {label: [r for r in comparison["runs"] if r["loss"] == label and "error" not in r] for label in labels}
    rows = []
    for c, name in enumerate(comparison["class_names"]):
        cells = []
        for label in labels:
            cells.append(Cell(*_stats([r["recall"][c] for r in by_loss[label]]), percent=True))
            cells.append(Cell(*_stats([r["f1"][c] for r in by_loss[label]]), percent=False))
        rows.append((str(name), comparison["train_counts"][c], comparison["test_counts"][c], _flag_best(cells)))
    summary = []
    for label in labels:
        summary.append(Cell(*_stats([r["balanced_accuracy"] for r in by_loss[label]]), percent=True))
        summary.append(Cell(*_stats([r["macro_f1"] for r in by_loss[label]]), percent=False))
    rows.append(("Balanced accuracy / macro F1", sum(comparison["train_counts"]), sum(comparison["test_counts"]),
                 _flag_best(summary)))
    failed = [f"{r['loss']} seed {r['seed']}" for r in comparison["runs"] if "error" in r]
    seeds = comparison["seeds"]
    note = (f"Held-out test split ({sum(comparison['test_counts'])} images), {len(seeds)} seed(s) "
            f"({', '.join(map(str, seeds))}); Acc = per-class recall in %, mean ± sample std over seeds."
            + (f" Diverged (left out): {', '.join(failed)}." if failed else ""))
    header = ["Class", "Training samples", "Test samples"]
    for label in labels:
        header += [f"{label} Acc", f"{label} F1"]
    return Table(labels, header, rows, note)


def _flag_best(cells: list[Cell]) -> list[Cell]:
    out = list(cells)
    for start in (0, 1):  # Acc columns, then F1 columns
        means = [c.mean for c in cells[start::2] if c.mean is not None]
        if len(means) > 1:
            top = max(means)
            for k in range(start, len(cells), 2):
                # numpy.isclose's tolerances, as before the move to the standard library
                if cells[k].mean is not None and math.isclose(cells[k].mean, top, rel_tol=1e-5, abs_tol=1e-8):
                    out[k] = Cell(cells[k].mean, cells[k].std, cells[k].percent, best=True)
    return out


SUMMARY_HEADER = ["Loss", "Tuned", "Balanced accuracy % [95 % CI]", "Difference to best [95 % CI]", "Verdict"]


def summary_rows(comparison: dict[str, Any]) -> list[list[str]]:
    """One row per loss from the paired statistics (compare.json format 2); empty for older ones."""
    rows = []
    for label, result in comparison.get("results", {}).items():
        accuracy, versus = result["balanced_accuracy"], result["vs_best"]
        if accuracy is None:
            rows.append([label, "yes" if result["tuned"] else "no", "-", "-", "diverged"])
            continue
        low, high = accuracy["ci95"]
        d_low, d_high = versus["ci95"]
        mark = "best" if result["best"] else ("worse" if result["distinguishable"] else "not distinguishable")
        rows.append([label, "yes" if result["tuned"] else "no",
                     f"{accuracy['mean'] * 100:.2f} [{low * 100:.2f}, {high * 100:.2f}]",
                     "-" if result["best"] else
                     f"{versus['difference'] * 100:+.2f} [{d_low * 100:+.2f}, {d_high * 100:+.2f}]", mark])
    return rows


def to_markdown(comparison: dict[str, Any]) -> str:
    """The summary with its intervals and the verdict first (the answer), then the per-class table."""
    t = table(comparison)
    rows = [[name, str(train), str(test), *(f"**{c.text()}**" if c.best else c.text() for c in cells)]
            for name, train, test, cells in t.rows]
    per_class = markdown_table(t.header, rows, right=[False] + [True] * (len(t.header) - 1)) + f"\n\n{t.note}\n"
    summary = summary_rows(comparison)
    if not summary:
        return per_class
    return (markdown_table(SUMMARY_HEADER, summary, right=[False, False, True, True, False])
            + f"\n\n{comparison['verdict']}\n\n{per_class}")


def to_csv(comparison: dict[str, Any]) -> str:
    """Numbers as fractions (not %), mean and std in separate columns: for spreadsheets and pandas."""
    import csv
    import io

    t = table(comparison)
    header = ["class", "train_samples", "test_samples"]
    for label in t.labels:
        header += [f"{label}_acc_mean", f"{label}_acc_std", f"{label}_f1_mean", f"{label}_f1_std"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for k, (name, train, test, cells) in enumerate(t.rows):
        values: list[Any] = ["balanced_accuracy/macro_f1" if k == len(t.rows) - 1 else name, train, test]
        for cell in cells:
            values += ["" if cell.mean is None else f"{cell.mean:.6f}", "" if cell.std is None else f"{cell.std:.6f}"]
        writer.writerow(values)
    return buffer.getvalue()


def rich_table(comparison: dict[str, Any]) -> RichTable:
    """The table for the terminal: the paper's columns; the spread under the mean keeps it narrow."""
    from rich.table import Table as RichTable

    t = table(comparison)
    out = RichTable(title=title(comparison), caption=t.note, title_justify="left")
    out.add_column("Class")
    out.add_column("Training\nsamples", justify="right")
    for label in t.labels:
        out.add_column(f"{label}\nAcc %", justify="right")
        out.add_column(f"{label}\nF1", justify="right")
    for k, (name, train, _, cells) in enumerate(t.rows):
        texts = [c.text().replace(" ± ", "\n±") for c in cells]
        texts = [f"[bold green]{text}[/]" if c.best else text for c, text in zip(cells, texts)]
        out.add_row(name, str(train), *texts, end_section=k == len(t.rows) - 2)
    return out


def rich_summary(comparison: dict[str, Any]) -> RichTable | None:
    """The summary with intervals for the terminal, its caption the verdict; None for older comparisons."""
    from rich.table import Table as RichTable

    rows = summary_rows(comparison)
    if not rows:
        return None
    out = RichTable(title="Held-out balanced accuracy, paired bootstrap", caption=comparison["verdict"],
                    title_justify="left")
    for k, column in enumerate(SUMMARY_HEADER):
        out.add_column(column, justify="right" if k in (2, 3) else "left")
    for row in rows:
        out.add_row(*(f"[bold green]{cell}[/]" if row[-1] == "best" else cell for cell in row))
    return out
