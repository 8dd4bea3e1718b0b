"""The whole tool through its real entry point, on the embedded store in a temp folder."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from conftest import cli, start_worker, write_config
from optuna.trial import TrialState

import alpa_tune


def _study(folder: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'alpa-tune.db'}")


def test_run_tiny_study_end_to_end_then_resume(tmp_path: Path) -> None:
    config = write_config(tmp_path, n_trials=2)
    done = cli("run", str(config), "--workers", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "best trial" in done.stdout

    best = json.loads((tmp_path / "alpa-tune-out" / "best.json").read_text())
    assert best["loss"] == "alpa" and best["study"] == "tiny"
    assert set(best["params"]) >= {"alpha", "beta", "gamma_pos", "gamma_neg", "clip", "variant"}
    assert 0 <= best["value"] <= 1
    assert len(best["metrics"]["fold_balanced_accuracy"]) == 2
    assert len(best["metrics"]["class_recall"]) == 4 and len(best["metrics"]["class_f1"]) == 4
    assert best["config"]["training"]["folds"] == 2 and best["alpa_tune_version"] == alpa_tune.__version__

    loss = alpa_tune.load_loss(tmp_path / "alpa-tune-out" / "best.json")
    value = loss(torch.randn(3, 4), torch.tensor([0, 1, 3]))
    assert torch.isfinite(value)

    study = _study(tmp_path, "tiny")
    complete = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(complete) == 2
    # The paper's first two points were enqueued and ran first.
    assert {(t.params["alpha"], t.params["beta"]) for t in complete} == {(1.0, 1.0), (0.875, 1.625)}
    assert all(t.user_attrs["worker"].count(":") == 1 for t in complete)

    # A rerun with a larger budget resumes the same study and tops it up.
    again = cli("run", str(config), "--trials", "3", "--workers", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    finished = _study(tmp_path, "tiny").get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 3
    # Rerunning a finished study starts nothing new.
    third = cli("run", str(config), "--trials", "3", "--workers", "1", cwd=tmp_path)
    assert third.returncode == 0
    assert len(_study(tmp_path, "tiny").trials) == 3


def test_two_workers_share_one_embedded_store(tmp_path: Path) -> None:
    config = write_config(tmp_path, n_trials=4, sampler="random")
    created = cli("study", "create", str(config), cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    url = f"sqlite:///{tmp_path / 'alpa-tune.db'}"
    logs = [tmp_path / f"w{rank}.log" for rank in range(2)]
    workers = [start_worker("tiny", url, "--rank", str(rank), cwd=tmp_path, log=logs[rank]) for rank in range(2)]
    codes = [w.wait(timeout=600) for w in workers]
    output = "".join(log.read_text() for log in logs)
    assert codes == [0, 0], output
    assert "locked" not in output.lower()
    study = _study(tmp_path, "tiny")
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2  # both took part


def test_study_commands_and_export(tmp_path: Path) -> None:
    config = write_config(tmp_path, n_trials=1)
    assert cli("run", str(config), "--workers", "1", cwd=tmp_path).returncode == 0
    listed = cli("study", "list", cwd=tmp_path)
    assert "tiny: 1/1 finished" in listed.stdout
    shown = cli("study", "show", "tiny", cwd=tmp_path)
    assert "COMPLETE" in shown.stdout and "WAITING" in shown.stdout  # the unused paper point stays queued
    exported = cli("export", "tiny", "-o", str(tmp_path / "e.json"), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert json.loads((tmp_path / "e.json").read_text())["trial"] == 0
    deleted = cli("study", "delete", "tiny", "--yes", cwd=tmp_path)
    assert deleted.returncode == 0
    assert "no studies" in cli("study", "list", cwd=tmp_path).stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("worker", "nope"), "study 'nope' does not exist"),
        # Read-only commands refuse a storage file that is not there instead of creating it.
        (("export", "nope"), "alpa-tune.db does not exist (nothing to read"),
        (("study", "show", "nope"), "alpa-tune.db does not exist (nothing to read"),
        (("study", "list", "--storage", "redis://localhost/0"), "unknown scheme 'redis'"),
        (("study", "list", "--storage", "sqlite:////no/such/folder/x.db"), "/no/such/folder/x.db does not exist"),
        (("run", "missing.toml"), "config file missing.toml does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


def test_bad_config_value_refused_before_any_work(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    done = cli("run", str(config), "--set", "training.folds=1", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: training.folds: must be >= 2, got 1"
    assert not (tmp_path / "alpa-tune.db").exists()


def test_unwritable_output_folder(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = cli("run", str(config), "--out", str(blocker / "out"), cwd=tmp_path)
    assert done.returncode == 2 and "not writable" in done.stderr


def test_worker_refuses_non_local_overrides(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert cli("study", "create", str(config), cwd=tmp_path).returncode == 0
    done = cli("worker", "tiny", "--set", "training.epochs=3", cwd=tmp_path)
    assert done.returncode == 2
    assert "--set training.epochs: a worker may change only machine-local keys" in done.stderr


def test_help_on_every_verb(tmp_path: Path) -> None:
    for verb in (["run"], ["launch"], ["worker"], ["export"], ["study", "create"], ["study", "list"],
                 ["study", "show"], ["study", "delete"]):
        done = cli(*verb, "--help", cwd=tmp_path)
        assert done.returncode == 0 and "Usage" in done.stdout


def test_run_exits_1_when_the_budget_cannot_be_reached(tmp_path: Path) -> None:
    config = write_config(tmp_path, n_trials=2, epochs=3)
    done = cli("run", str(config), "--workers", "1", "--set", "training.lr=1e30", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "giving up after 5 failed trials in a row" in done.stdout  # the worker's reason, via the launcher
    assert "did not reach its budget" in done.stderr
    assert not (tmp_path / "alpa-tune-out" / "best.json").exists()
    failed = _study(tmp_path, "tiny").get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 5 and all("loss became" in t.user_attrs["fail_reason"] for t in failed)
