"""``alpa-tune dashboard``: the real optuna-dashboard on a study in the real PostgreSQL."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from conftest import cli, write_config
from test_export import STUDY, finished_study, sqlite_url

from alpa_tune import dashboard
from alpa_tune.config import load_config
from alpa_tune.dashboard import DashboardError, exposure_warning, is_loopback, study_note
from alpa_tune.storage import open_storage
from alpa_tune.study import create_study


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_study(tmp_path_factory, tmp_path_factory.mktemp("dashboard"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def wait_for_api(base: str, server: subprocess.Popen, attempts: int = 240) -> dict:
    """Poll /api/studies until the server answers (it starts in a few seconds; no timing is asserted)."""
    for _ in range(attempts):
        if server.poll() is not None:
            pytest.fail(f"the dashboard exited with {server.returncode}: {server.stderr.read()}")
        try:
            return get_json(f"{base}/api/studies")
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    pytest.fail("the dashboard never answered")


def test_dashboard_serves_the_study_and_trial_attrs_from_postgresql(study_dir: Path, pg_url: str) -> None:
    url = pg_url.replace("postgres@", "postgres:s3cr3t-pw@")  # trusted locally; must never be printed
    optuna.copy_study(from_study_name=STUDY, from_storage=sqlite_url(study_dir), to_storage=open_storage(url))
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ALPA_TUNE_STORAGE", None)
    server = subprocess.Popen([sys.executable, "-m", "alpa_tune", "dashboard", "--storage", url, "--port", str(port)],
                              cwd=study_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        listed = wait_for_api(base, server)
        study_id = next(s["study_id"] for s in listed["study_summaries"] if s["study_name"] == STUDY)
        detail = get_json(f"{base}/api/studies/{study_id}")
    finally:
        server.terminate()
        output, errors = server.communicate(timeout=60)
    assert detail["name"] == STUDY
    complete = [t for t in detail["trials"] if t["state"] == "Complete"]
    assert len(complete) == 2
    for trial in complete:
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        assert {"fold_balanced_accuracy", "class_recall", "class_f1", "epoch_seconds", "device", "worker",
                "dataset_fingerprint"} <= set(attrs)
        assert len(json.loads(attrs["fold_balanced_accuracy"])) == 2
    # The note create_study saved (copied with the study) describes the config.
    assert "## tiny: ALPA loss search" in detail["note"]["body"] and "2-fold CV" in detail["note"]["body"]
    assert f"http://127.0.0.1:{port}/" in errors and "warning" not in errors  # loopback: no warning
    assert "s3cr3t-pw" not in output + errors and "***" in errors


def test_a_taken_port_is_one_line_exit_2(tmp_path: Path) -> None:
    open_storage(f"sqlite:///{tmp_path / 'x.db'}")  # an existing (empty) storage: only the port is wrong
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli("dashboard", "--port", str(port), "--storage", f"sqlite:///{tmp_path / 'x.db'}", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


def test_loopback_and_the_warning_elsewhere() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert is_loopback(host) and exposure_warning(host, 8080) is None
    for host in ("0.0.0.0", "::", "10.1.2.3", "dashboard.example.org"):
        assert not is_loopback(host)
        assert "no authentication" in exposure_warning(host, 8080)


def test_missing_optuna_dashboard_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # import fails as if not installed
    with pytest.raises(DashboardError, match="optuna-dashboard is not installed"):
        dashboard.serve(f"sqlite:///{tmp_path / 'x.db'}", port=free_port())
    # Creating a study still works without it (the note is simply not saved).
    study = create_study(load_config(write_config(tmp_path)), sqlite_url(tmp_path))
    assert not any(key.startswith("dashboard:") for key in study._storage.get_study_system_attrs(study._study_id))


def test_new_study_carries_a_note_describing_its_config(tmp_path: Path) -> None:
    from optuna_dashboard import get_note

    config = load_config(write_config(tmp_path))
    create_study(config, sqlite_url(tmp_path))
    study = optuna.load_study(study_name="tiny", storage=sqlite_url(tmp_path))
    body = get_note(study)
    assert body == study_note(config)
    assert "synthetic" in body and "resnet10t" in body and "alpha in [0.5, 2]" in body and "```toml" in body
    create_study(config, sqlite_url(tmp_path))  # loading it again does not write a second version
    assert study._storage.get_study_system_attrs(study._study_id)["dashboard:note_ver"] == 1
