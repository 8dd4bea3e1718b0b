"""One study, one record: a rerun with other settings is refused before any work; the budget
changes only as asked; running workers honour a lowered budget exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
from conftest import cli, finish, read_logs, wait_for, write_config
from optuna.trial import TrialState

from alpa_tune.storage import open_storage
from alpa_tune.study import BUDGET_ATTR


def _study(url: str) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=open_storage(url, read_only=True))


def _finished(url: str) -> int:
    return len(_study(url).get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))


def test_a_rerun_with_other_settings_is_refused_key_by_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, n_trials=1, epochs=1)
    assert cli("run", str(config), "--workers", "1", cwd=tmp_path).returncode == 0
    url = f"sqlite:///{tmp_path / 'alpa-tune.db'}"
    trials_before = len(_study(url).trials)

    done = cli("run", str(config), "--trials", "3", "--set", "training.lr=0.5", "--set", "model.backbone=resnet18",
               cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "error: study 'tiny' was created with other settings; every trial of a study trains the same way:"
    assert lines[1:3] == ["  model.backbone: stored 'resnet10t', given 'resnet18'", "  training.lr: stored 0.003, given 0.5"]
    assert "--set name=NEW_NAME" in lines[-1] and "Traceback" not in done.stderr
    assert "data:" not in done.stdout  # refused before the data was prepared
    assert len(_study(url).trials) == trials_before and _study(url).user_attrs[BUDGET_ATTR] == 1

    # study create guards the same record; machine-local keys are not drift.
    assert cli("study", "create", str(config), "--set", "training.folds=3", cwd=tmp_path).returncode == 2
    local = cli("run", str(config), "--workers", "1", "--set", "training.threads=1",
                "--set", f'data.cache_dir="{tmp_path / "cache"}"', cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    # The way out it names works: the same settings under another name are a new study.
    renamed = cli("study", "create", str(config), "--set", "training.lr=0.5", "--set", "name=tiny-lr", cwd=tmp_path)
    assert renamed.returncode == 0, renamed.stderr


def test_trials_below_the_finished_count_change_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path, n_trials=2, epochs=1)
    assert cli("run", str(config), "--workers", "1", cwd=tmp_path).returncode == 0
    url = f"sqlite:///{tmp_path / 'alpa-tune.db'}"
    done = cli("run", str(config), "--trials", "1", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: --trials 1: study 'tiny' already has 2 finished trials; nothing was "
                                   "changed (a budget counts finished trials, so it cannot go below that)")
    assert _study(url).user_attrs[BUDGET_ATTR] == 2


def test_a_budget_lowered_under_two_running_workers_is_met_exactly(tmp_path: Path, pg_url: str) -> None:
    config = write_config(tmp_path, n_trials=12, epochs=1, sampler="random")
    assert cli("study", "create", str(config), "--storage", pg_url).returncode == 0
    # Both workers hold a finished-but-unrecorded trial while the budget is lowered under them.
    flag = tmp_path / "pause"
    flag.write_text("")
    env = {**os.environ, "ALPA_TUNE_STORAGE": pg_url, "OMP_NUM_THREADS": "1", "ALPA_TUNE_TEST_PAUSE_BEFORE_RECORD": str(flag)}
    logs = [tmp_path / f"w{r}.log" for r in range(2)]
    workers = [subprocess.Popen([sys.executable, "-m", "alpa_tune", "worker", "tiny", "--threads", "1"], env=env,
                                stdout=open(logs[r], "ab"), stderr=subprocess.STDOUT) for r in range(2)]
    wait_for(lambda: len(list(tmp_path.glob("pause.*"))) == 2, 300, "both workers holding a trial")
    refused = cli("run", str(config), "--storage", pg_url, "--trials", "3", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip() == ("error: --trials 3 is below study 'tiny''s budget of 12; nothing was changed. "
                                      "To lower it (running workers stop at the new budget), add --lower-budget")
    lower = subprocess.Popen([sys.executable, "-m", "alpa_tune", "run", str(config), "--storage", pg_url, "--trials", "3",
                              "--lower-budget", "--workers", "1", "--out", str(tmp_path / "out")], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for(lambda: _study(pg_url).user_attrs[BUDGET_ATTR] == 3, 120, "the lowered budget")
    flag.unlink()
    assert finish([*workers, lower]) == [0, 0, 0], read_logs(logs) + lower.stdout.read()
    study = _study(pg_url)
    assert _finished(pg_url) == 3  # not one more, although 12 were asked for when the workers started
    assert not study.get_trials(states=(TrialState.RUNNING,))
