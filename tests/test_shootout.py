"""A fair shootout through the real CLI: every loss tuned in its own study with the same budget,
the winners compared on the held-out split with paired statistics, and a rerun (or a resume
after SIGKILL) that trains nothing twice. On the embedded SQLite store and on PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
from conftest import cli, wait_for, write_config

from alpa_tune.shootout import HOLDOUT_RUNS_ATTR
from alpa_tune.storage import open_storage


def _finished(url: str, name: str) -> int:
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)))


def _stored(url: str, names: list[str]) -> dict[str, dict]:
    """Every held-out run the shootout stored, by key, over the given studies."""
    kept: dict[str, dict] = {}
    for name in names:
        try:
            study = optuna.load_study(study_name=name, storage=open_storage(url))
        except KeyError:
            continue
        kept.update(study.user_attrs.get(HOLDOUT_RUNS_ATTR, {}))
    return kept


def _shootout(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli("compare", "tiny.toml", "--tune", "ce,focal", "--trials", "2", "--seeds", "2", "--workers", "1",
               "-o", "cmp/shootout", *extra, cwd=folder)


def test_shootout_on_sqlite_then_a_rerun_trains_nothing(tmp_path: Path) -> None:
    write_config(tmp_path)
    url = f"sqlite:///{tmp_path / 'alpa-tune.db'}"
    first = _shootout(tmp_path, "--paper-defaults")
    assert first.returncode == 0, first.stdout + first.stderr
    # CE declares no parameter: one trial; focal gets the budget.
    assert _finished(url, "tiny-ce") == 1 and _finished(url, "tiny-focal") == 2
    comparison = json.loads((tmp_path / "cmp" / "shootout.json").read_text())
    assert list(comparison["results"]) == ["ce", "focal", "focal_paper"]
    ce, focal, paper = (comparison["results"][k] for k in ("ce", "focal", "focal_paper"))
    assert ce["tuned"] and ce["study"] == "tiny-ce" and focal["tuned"] and focal["study"] == "tiny-focal"
    assert not paper["tuned"] and paper["study"] is None and paper["params"]["gamma"] == 2.0
    best = optuna.load_study(study_name="tiny-focal", storage=open_storage(url)).best_trial
    assert {k: v for k, v in best.user_attrs["loss"]["params"].items()} == focal["params"]
    assert len(comparison["runs"]) == 6 and comparison["reused_runs"] == 0
    assert comparison["verdict"] in first.stdout and "| focal_paper | no |" in first.stdout
    assert len(_stored(url, ["tiny-ce", "tiny-focal"])) == 6

    again = _shootout(tmp_path, "--paper-defaults")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "study tiny-ce: budget of 1 met" in again.stdout and "study tiny-focal: budget of 2 met" in again.stdout
    assert "held-out: 6 training(s) reused from the studies, 0 to run" in again.stdout
    assert _finished(url, "tiny-ce") == 1 and _finished(url, "tiny-focal") == 2
    rerun = json.loads((tmp_path / "cmp" / "shootout.json").read_text())
    assert rerun["reused_runs"] == 6 and rerun["runs"] == comparison["runs"]  # the very same trainings
    assert rerun["results"] == comparison["results"]


def test_shootout_on_postgres(tmp_path: Path, pg_url: str) -> None:
    write_config(tmp_path)
    done = _shootout(tmp_path, "--storage", pg_url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _finished(pg_url, "tiny-ce") == 1 and _finished(pg_url, "tiny-focal") == 2
    comparison = json.loads((tmp_path / "cmp" / "shootout.json").read_text())
    assert list(comparison["results"]) == ["ce", "focal"] and len(comparison["runs"]) == 4
    assert len(_stored(pg_url, ["tiny-ce", "tiny-focal"])) == 4
    assert "postgres" in done.stdout and "stored in study tiny-focal" in done.stdout


def test_a_killed_shootout_resumes_without_training_anything_twice(tmp_path: Path) -> None:
    write_config(tmp_path)
    url = f"sqlite:///{tmp_path / 'alpa-tune.db'}"
    command = [sys.executable, "-m", "alpa_tune", "compare", "tiny.toml", "--tune", "ce,focal", "--trials", "2",
               "--seeds", "3", "--workers", "1", "-o", "cmp/shootout"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ALPA_TUNE_STORAGE", None)
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Killed in the held-out phase, after two of its six trainings were stored.
        wait_for(lambda: len(_stored(url, ["tiny-ce", "tiny-focal"])) >= 2, 600, "two stored held-out runs")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    before = _stored(url, ["tiny-ce", "tiny-focal"])
    assert 2 <= len(before) < 6

    resumed = cli("compare", *command[4:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"held-out: {len(before)} training(s) reused from the studies, {6 - len(before)} to run" in resumed.stdout
    assert _finished(url, "tiny-ce") == 1 and _finished(url, "tiny-focal") == 2  # no study trained again
    after = _stored(url, ["tiny-ce", "tiny-focal"])
    assert len(after) == 6
    assert all(after[key] == run for key, run in before.items())  # the stored trainings were not redone
    comparison = json.loads((tmp_path / "cmp" / "shootout.json").read_text())
    assert comparison["reused_runs"] == len(before) and len(comparison["runs"]) == 6
    trained = [run["trained_at"] for run in comparison["runs"]]
    assert len(set(trained)) == 6  # every (loss, seed) trained exactly once over both runs


def test_compare_takes_exactly_one_of_best_and_tune(tmp_path: Path) -> None:
    write_config(tmp_path)
    for args in ([], ["--best", "b.json", "--tune", "ce"], ["--best", "b.json", "--trials", "3"]):
        done = cli("compare", "tiny.toml", *args, cwd=tmp_path)
        assert done.returncode == 2 and done.stderr.startswith("error: compare:"), done.stderr
    bad = cli("compare", "tiny.toml", "--tune", "ce,hinge", cwd=tmp_path)
    assert bad.returncode == 2 and "--tune: 'hinge'" in bad.stderr
    assert not (tmp_path / "alpa-tune.db").exists()
