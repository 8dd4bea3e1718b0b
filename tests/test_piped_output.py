"""Output into a pipe or file (a SLURM or CI log): every table and line whole, nothing cut to "…".

Real ``alpa-tune`` processes with stdout redirected to a file and no COLUMNS, on a real
SQLite study: the case where rich, sized to 80 columns, used to truncate every cell.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import write_config

# Anything that would make rich treat the pipe as a terminal, or size it, is left out.
_TERMINAL_HINTS = ("ALPA_TUNE_STORAGE", "COLUMNS", "LINES", "FORCE_COLOR", "FORCE_TERMINAL", "TTY_COMPATIBLE")


def piped(*args: str, cwd: Path) -> str:
    """``alpa-tune ARGS > LOG`` as a batch job runs it; the log's text (exit 0 asserted)."""
    env = {k: v for k, v in os.environ.items() if k not in _TERMINAL_HINTS}
    env["OMP_NUM_THREADS"] = "1"
    log = cwd / ("-".join(args[:2]).replace("/", "_") + ".log")
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "alpa_tune", *args], cwd=cwd, env=env, stdout=out,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, timeout=600)
    text = log.read_text()
    assert done.returncode == 0, text + done.stderr
    assert "…" not in text, text
    return text


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny study run to its budget of 2 trials, the launcher's view going to a log file."""
    folder = tmp_path_factory.mktemp("piped-output-in-a-folder-as-deep-as-a-cluster-scratch-path")
    write_config(folder, n_trials=2, epochs=1)
    # An absolute URL: a line longer than 80 columns, which rich used to fold.
    url = f"sqlite:///{folder / 'alpa-tune.db'}"
    return folder, piped("run", "tiny.toml", "--workers", "1", "--storage", url, cwd=folder)


def test_piped_run_prints_progress_lines_not_a_live_table(ran: tuple[Path, str]) -> None:
    folder, log = ran
    lines = log.splitlines()
    opening = f"study tiny in sqlite:///{folder}/alpa-tune.db"
    assert len(opening) > 80 and opening in lines  # one line, not folded at 80 columns
    finished = [int(m.group(1)) for m in (re.match(r"tiny: (\d)/2 finished \(", line) for line in lines) if m]
    assert finished[0] == 0 and finished[-1] == 2 and finished == sorted(finished), log
    assert "worker 0: running" in lines and "worker 0: exited 0" in lines
    assert not any(box in log for box in "┃━┏"), log  # no rich table redrawn into the log


def test_piped_study_show_holds_every_trial_whole(ran: tuple[Path, str]) -> None:
    folder, _ = ran
    out = piped("study", "show", "tiny", cwd=folder)
    header = "| trial | state | value | variant | alpha | beta | gamma_pos | gamma_neg | worker | note |"
    assert header in out.splitlines(), out
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder / 'alpa-tune.db'}").trials
    assert sum(t.state.is_finished() for t in trials) == 2
    for t in trials:
        p = t.params or t.system_attrs["fixed_params"]
        row = next((line for line in out.splitlines() if line.startswith(f"| {t.number} | {t.state.name} |")), None)
        assert row is not None, out
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[2] == ("-" if t.value is None else f"{t.value:.4f}")
        assert cells[3:8] == [str(p["variant"]), *(f"{p[k]:.3f}" for k in ("alpha", "beta", "gamma_pos", "gamma_neg"))]
        assert cells[8] == t.user_attrs.get("worker", "-")  # host:pid, however long the host name


def test_piped_compare_holds_every_label_and_number(ran: tuple[Path, str]) -> None:
    folder, _ = ran
    out = piped("compare", "tiny.toml", "--best", "alpa-tune-out/best.json", "--losses", "ce,alpa",
                "--seeds", "1", "--workers", "1", "-o", "cmp/tiny", cwd=folder)
    comparison = json.loads((folder / "cmp" / "tiny.json").read_text())
    lines = out.splitlines()
    assert "| Class | Training samples | Test samples | ce Acc | ce F1 | alpa Acc | alpa F1 |" in lines, out
    assert max(map(len, lines)) > 80  # no folding at the 80 columns rich assumes for a pipe
    for name in [*comparison["class_names"], "Balanced accuracy / macro F1"]:
        assert any(line.startswith(f"| {name} |") for line in lines), out
    for run in comparison["runs"]:  # one seed: each cell is the run's own number, no spread
        numbers = [f"{run['balanced_accuracy'] * 100:.2f}", f"{run['macro_f1']:.3f}"]
        numbers += [f"{v * 100:.2f}" for v in run["recall"] if v is not None]
        numbers += [f"{v:.3f}" for v in run["f1"] if v is not None]
        for number in numbers:
            assert re.search(rf"\| (\*\*)?{re.escape(number)}(\*\*)? \|", out), (number, out)
    for label, result in comparison["results"].items():  # the summary: every mean and interval whole
        low, high = result["balanced_accuracy"]["ci95"]
        interval = f"{result['balanced_accuracy']['mean'] * 100:.2f} [{low * 100:.2f}, {high * 100:.2f}]"
        assert any(line.startswith(f"| {label} |") and interval in line for line in lines), (interval, out)
    assert comparison["verdict"] in lines, out
    assert "wrote cmp/tiny.csv, cmp/tiny.md, cmp/tiny.json" in out
