"""Every loss is tunable: a study config picks `search.loss`; its declared space is searched, and
trials, export, load_loss, `study show` and the report work for it (real CLI, real SQLite)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from conftest import cli, write_config

import alpa_tune
from alpa_tune.report import build_report
from alpa_tune.storage import open_storage


def _study(folder: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(f"sqlite:///{folder / 'alpa-tune.db'}"))


def test_a_focal_study_end_to_end(tmp_path: Path) -> None:
    config = write_config(tmp_path, "focal", n_trials=3)
    done = cli("run", str(config), "--workers", "1", "--set", 'search.loss="focal"',
               "--set", "search.space.gamma=[0.5, 3.0]", "--set", 'search.sampler="random"', cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr

    study = _study(tmp_path, "focal")
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 3
    for trial in complete:
        assert set(trial.params) <= {"gamma", "use_alpha", "alpha"} and "gamma" in trial.params
        assert 0.5 <= trial.params["gamma"] <= 3.0
        assert trial.user_attrs["loss"]["name"] == "focal"
        assert trial.user_attrs["loss"]["params"]["gamma"] == trial.params["gamma"]

    best = json.loads((tmp_path / "alpa-tune-out" / "best.json").read_text())
    winner = max(complete, key=lambda t: (t.value, -t.number))
    assert best["loss"] == "focal" and best["params"] == winner.user_attrs["loss"]["params"]
    loss = alpa_tune.load_loss(str(tmp_path / "alpa-tune-out" / "best.json"))
    assert type(loss).__name__ == "FocalLoss" and loss.params["gamma"] == winner.params["gamma"]

    shown = cli("study", "show", "focal", cwd=tmp_path)
    assert shown.returncode == 0 and "gamma" in shown.stdout and "alpha" in shown.stdout, shown.stdout
    page = build_report(study)
    assert "Slice plots" in page and "could not draw" not in page.split("Slice plots")[1].split("</section>")[0]


def test_a_class_balanced_study_exports_a_loadable_loss(tmp_path: Path) -> None:
    """cb is built from class counts: each fold's own in training, the development split's in the export."""
    config = write_config(tmp_path, "cb", n_trials=2)
    done = cli("run", str(config), "--workers", "1", "--set", 'search.loss="cb"',
               "--set", "search.space.base=['ce']", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    best = json.loads((tmp_path / "alpa-tune-out" / "best.json").read_text())
    assert best["loss"] == "cb" and best["params"]["base"] == "ce"
    assert 0.9 <= best["params"]["beta"] <= 0.9999
    assert len(best["params"]["class_counts"]) == 4 and all(n > 0 for n in best["params"]["class_counts"])
    loss = alpa_tune.load_loss(str(tmp_path / "alpa-tune-out" / "best.json"))
    assert type(loss).__name__ == "ClassBalancedLoss"


def test_a_key_the_loss_does_not_declare_is_one_line_before_any_work(tmp_path: Path) -> None:
    config = write_config(tmp_path, "typo")
    done = cli("run", str(config), "--set", 'search.loss="focal"', "--set", "search.space.gama=1.0", cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error: search.space (focal)" in done.stderr and "'gama'" in done.stderr and "gamma" in done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert not (tmp_path / "alpa-tune.db").exists()
    unknown = cli("run", str(config), "--set", 'search.loss="hinge"', cwd=tmp_path)
    assert unknown.returncode == 2 and "search.loss: 'hinge' is not one of" in unknown.stderr


def test_switching_the_loss_of_an_existing_study_is_drift(tmp_path: Path) -> None:
    config = write_config(tmp_path, "same")
    assert cli("study", "create", str(config), cwd=tmp_path).returncode == 0
    done = cli("run", str(config), "--set", 'search.loss="focal"', cwd=tmp_path)
    assert done.returncode == 2
    assert "search.loss: stored 'alpa', given 'focal'" in done.stderr
