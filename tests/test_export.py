"""``alpa-tune export``: JSON, TOML and Python exports of a real finished study, read back by load_loss.

Also home of :func:`finished_study`, the one real tiny study the after-tuning tests share.
"""

from __future__ import annotations

import fcntl
import json
import math
import runpy
import sqlite3
import subprocess
import tomllib
from pathlib import Path

import optuna
import pytest
import torch
from conftest import cli, write_config

import alpa_tune
from alpa_tune.config import load_config
from alpa_tune.export import render_records, study_records, write_records
from alpa_tune.records import ExportError, load_loss, read_record, read_records
from alpa_tune.storage import open_storage
from alpa_tune.study import create_study

STUDY = "tiny"


def finished_study(tmp_path_factory: pytest.TempPathFactory, dest: Path) -> Path:
    """Copy a finished 2-trial tiny study (alpa-tune.db, tiny.toml, best.json) into ``dest``.

    The study is trained once per test session (a real ``alpa-tune run``, ~15 s) and copied,
    so each test module can change its copy freely.
    """
    base = tmp_path_factory.getbasetemp() / "finished-tiny"
    base.mkdir(exist_ok=True)
    with open(base / ".lock", "a+") as lock:  # pytest-xdist workers build it once, too
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / "done").exists():
            config = write_config(base, STUDY, n_trials=2)
            done = cli("run", str(config), "--workers", "1", cwd=base)
            assert done.returncode == 0, done.stdout + done.stderr
            (base / "done").write_text("")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tiny.toml").write_text((base / "tiny.toml").read_text())
    (dest / "best.json").write_text((base / "alpa-tune-out" / "best.json").read_text())
    with sqlite3.connect(base / "alpa-tune.db") as source, sqlite3.connect(dest / "alpa-tune.db") as target:
        source.backup(target)  # a consistent copy, WAL included
    return dest


def sqlite_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'alpa-tune.db'}"


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_study(tmp_path_factory, tmp_path_factory.mktemp("export"))


def _one_line_exit_2(done: subprocess.CompletedProcess, message: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


def _study(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=sqlite_url(folder))


@pytest.mark.parametrize(("fmt", "suffix"), [("json", ".json"), ("toml", ".toml"), ("python", ".py")])
def test_each_format_round_trips_through_load_loss(study_dir: Path, fmt: str, suffix: str) -> None:
    study = _study(study_dir)
    path = study_dir / f"out{suffix}"
    write_records(study_records(study), path, fmt)
    record = read_record(path)
    best = study.best_trial
    assert record["trial"] == best.number and record["value"] == pytest.approx(best.value)
    assert {"alpha", "beta", "gamma_pos", "gamma_neg", "clip", "variant"} <= set(record["params"])
    assert record["params"]["alpha"] == best.params["alpha"]
    # Per-fold and per-class metrics, and provenance.
    assert len(record["metrics"]["fold_balanced_accuracy"]) == 2 and len(record["metrics"]["class_f1"]) == 4
    assert record["study"] == STUDY and record["dataset_fingerprint"] == best.user_attrs["dataset_fingerprint"]
    assert record["config"]["training"]["folds"] == 2
    assert {"alpa-tune", "python", "torch", "optuna", "timm"} <= set(record["versions"])
    loss = alpa_tune.load_loss(str(path))
    assert loss.params == alpa_tune.build_loss(record["loss"], **record["params"]).params
    assert torch.isfinite(loss(torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])))


def test_top_k_in_every_format(study_dir: Path) -> None:
    records = study_records(_study(study_dir), top=5)
    assert len(records) == 2  # only 2 completed trials: K is capped, not padded
    for fmt, suffix in (("json", ".json"), ("toml", ".toml"), ("python", ".py")):
        path = study_dir / f"top{suffix}"
        write_records(records, path, fmt)
        back = read_records(path)
        assert [r["rank"] for r in back] == [1, 2] and [r["trial"] for r in back] == [r["trial"] for r in records]
        assert back[0]["value"] >= back[1]["value"]
        assert load_loss(path, rank=2).params["alpha"] == records[1]["params"]["alpha"]
    assert isinstance(json.loads((study_dir / "top.json").read_text()), list)


def test_cli_export_picks_the_format_from_the_suffix(study_dir: Path) -> None:
    done = cli("export", STUDY, "--top", "2", "-o", str(study_dir / "cli.toml"), cwd=study_dir)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "2 trial(s)" in done.stdout
    data = tomllib.loads((study_dir / "cli.toml").read_text())  # TOML, not JSON
    assert [t["rank"] for t in data["trials"]] == [1, 2]


def test_cli_python_snippet_goes_to_stdout_and_builds_the_loss(study_dir: Path) -> None:
    done = cli("export", STUDY, "--format", "python", cwd=study_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith('"""Tuned loss from alpa-tune') and "loss = build_loss(LOSS, **PARAMS)" in done.stdout
    path = study_dir / "snippet.py"
    path.write_text(done.stdout)
    namespace = runpy.run_path(str(path))  # what a user does with it
    assert type(namespace["loss"]).__name__ == "ALPALoss"
    assert namespace["loss"].params == load_loss(path).params == load_loss(study_dir / "best.json").params


def test_loading_a_python_export_never_runs_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "edited.py"
    path.write_text(f"open({str(marker)!r}, 'w').close()\n"
                    "LOSS = 'alpa'\nPARAMS = {'alpha': 1.5, 'beta': 1.0, 'gamma_pos': 0.0, 'gamma_neg': 4.0}\n")
    assert load_loss(path).params["alpha"] == 1.5
    assert not marker.exists()
    path.write_text(f"LOSS = 'alpa'\nPARAMS = {{'alpha': __import__('os').remove({str(path)!r})}}\n")
    with pytest.raises(ExportError, match="not a readable alpa-tune export"):
        load_loss(path)
    assert path.exists()


def test_an_edited_params_literal_wins_and_non_literals_are_refused(study_dir: Path) -> None:
    path = study_dir / "tweak.py"
    write_records(study_records(_study(study_dir)), path, "python")
    lines = path.read_text().splitlines()
    k = next(i for i, line in enumerate(lines) if line.startswith("    'alpha': "))  # inside PARAMS
    lines[k] = "    'alpha': 0.625,"
    path.write_text("\n".join(lines) + "\n")
    assert load_loss(path).params["alpha"] == 0.625  # what the snippet builds is what loads
    lines[k] = "    'alpha': 0.5 or 1,"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ExportError, match="not a readable alpa-tune export"):
        load_loss(path)


def test_toml_keeps_missing_per_class_values() -> None:
    record = {"loss": "alpa", "params": {"alpha": 1.0, "beta": 1.0, "gamma_pos": 0.0, "gamma_neg": 4.0},
              "value": 0.5, "study": "s \"quoted\"", "trial": 3,
              "metrics": {"class_recall": [0.5, None], "class_names": ["a b", "ü"]}, "dataset_fingerprint": None}
    back = tomllib.loads(render_records([record], "toml"))
    assert back["metrics"]["class_recall"][0] == 0.5 and math.isnan(back["metrics"]["class_recall"][1])
    assert back["metrics"]["class_names"] == ["a b", "ü"] and back["study"] == 's "quoted"'
    assert "dataset_fingerprint" not in back  # TOML has no null


def test_no_password_in_any_export_or_message(tmp_path: Path, study_dir: Path, pg_url: str) -> None:
    # The local server trusts connections, so a password in the URL is accepted (and ignored).
    url = pg_url.replace("postgres@", "postgres:s3cr3t-pw@")
    optuna.copy_study(from_study_name=STUDY, from_storage=sqlite_url(study_dir), to_storage=open_storage(url))
    path = tmp_path / "pg.toml"
    done = cli("export", STUDY, "--storage", url, "-o", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "s3cr3t-pw" not in path.read_text() + done.stdout + done.stderr
    missing = cli("export", "nope", "--storage", url, cwd=tmp_path)
    _one_line_exit_2(missing, "study 'nope' does not exist")
    assert "s3cr3t-pw" not in missing.stderr and "***" in missing.stderr
    # Even a record that picked up a URL somewhere leaves without its password.
    record = {"loss": "alpa", "params": {}, "value": 0.5, "study": "s", "trial": 0, "note": url}
    for fmt in ("json", "toml", "python"):
        assert "s3cr3t-pw" not in render_records([record], fmt)


def test_empty_study(tmp_path: Path) -> None:
    config = write_config(tmp_path, "empty")
    create_study(load_config(config), sqlite_url(tmp_path))
    _one_line_exit_2(cli("export", "empty", cwd=tmp_path), "study 'empty' has no completed trial yet")


def test_unwritable_output_and_bad_format(study_dir: Path) -> None:
    blocker = study_dir / "a-file"
    blocker.write_text("")
    _one_line_exit_2(cli("export", STUDY, "-o", str(blocker / "best.json"), cwd=study_dir), "cannot")
    with pytest.raises(ExportError, match="--format: 'yaml' is not one of json, toml, python"):
        render_records(study_records(_study(study_dir)), "yaml")


@pytest.mark.parametrize(("name", "text", "message"), [
    ("missing.json", None, "does not exist"),
    ("garbage.json", "{not json", "is not a readable alpa-tune export"),
    ("other.json", '{"hello": 1}', "no 'loss' name and 'params' table"),
    ("bad.toml", "loss = ", "is not a readable alpa-tune export"),
    ("empty.py", "x = 1\n", "is not a readable alpa-tune export"),
    ("noext", "loss = 'alpa'\n", "no 'loss' name and 'params' table"),
])
def test_files_that_are_not_exports(tmp_path: Path, name: str, text: str | None, message: str) -> None:
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(ExportError, match=message):
        load_loss(tmp_path / name)
