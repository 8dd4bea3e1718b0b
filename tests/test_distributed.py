"""Many workers on the real PostgreSQL: exact budget, crash recovery, connection loss, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from conftest import cli, finish, read_logs, start_worker, wait_for, write_config
from optuna.trial import TrialState

from alpa_tune.storage import driver_url


def _study(url: str, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=driver_url(url))


def _running_trial_of(url: str, pid: int) -> optuna.trial.FrozenTrial | None:
    for trial in _study(url).get_trials(states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("worker", "").endswith(f":{pid}") and "progress" in trial.user_attrs:
            return trial
    return None


def test_four_workers_meet_a_budget_of_twelve_exactly(tmp_path: Path, pg_url: str) -> None:
    config = write_config(tmp_path, n_trials=12, sampler="random")
    assert cli("study", "create", str(config), "--storage", pg_url).returncode == 0
    logs = [tmp_path / f"w{r}.log" for r in range(4)]
    workers = [start_worker("tiny", pg_url, "--rank", str(r), log=logs[r]) for r in range(4)]
    assert finish(workers) == [0, 0, 0, 0], read_logs(logs)
    study = _study(pg_url)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 12
    assert TrialState.RUNNING not in states and TrialState.FAIL not in states
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(params)) == len(params) == 12  # every rank samples its own points
    assert len({t.user_attrs["worker"] for t in study.trials}) >= 2


@pytest.fixture(params=["postgresql", "sqlite"])
def recovering_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Both storages whose heartbeats recover a dead worker's trial."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'embedded.db'}"
    return request.getfixturevalue("pg_url")


def test_sigkilled_worker_trial_is_failed_and_rerun_with_same_params(tmp_path: Path, recovering_url: str) -> None:
    pg_url = recovering_url
    # Long enough trials (6 epochs x 2 folds) to be killed in the middle of one.
    config = write_config(tmp_path, n_trials=3, epochs=6, sampler="random")
    assert cli("study", "create", str(config), "--storage", pg_url).returncode == 0
    logs = [tmp_path / "victim.log", tmp_path / "survivor.log"]
    victim = start_worker("tiny", pg_url, "--rank", "0", log=logs[0])
    killed = wait_for(lambda: _running_trial_of(pg_url, victim.pid), 120, "the victim's first trial")
    survivor = start_worker("tiny", pg_url, "--rank", "1", log=logs[1])
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert survivor.wait(timeout=600) == 0, read_logs(logs)

    study = _study(pg_url)
    assert study.trials[killed.number].state == TrialState.FAIL  # through the heartbeat, not by the victim
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1
    assert retries[0].params == killed.params and retries[0].state == TrialState.COMPLETE
    assert retries[0].user_attrs["worker"].endswith(f":{survivor.pid}")
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3


def test_workers_survive_every_connection_being_terminated(tmp_path: Path, pg_url: str) -> None:
    config = write_config(tmp_path, n_trials=6, epochs=3, sampler="random")
    assert cli("study", "create", str(config), "--storage", pg_url).returncode == 0
    logs = [tmp_path / f"w{r}.log" for r in range(2)]
    workers = [start_worker("tiny", pg_url, "--rank", str(r), log=logs[r]) for r in range(2)]
    wait_for(lambda: any(_running_trial_of(pg_url, w.pid) for w in workers), 120, "a running trial")
    database = pg_url.rsplit("/", 1)[1]
    admin = sqlalchemy.create_engine(driver_url(pg_url).rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    terminated = 0
    for _ in range(3):  # more than once: mid-trial, and again while workers reconnect
        with admin.connect() as connection:
            terminated += connection.execute(sqlalchemy.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = :db AND pid <> pg_backend_pid()"), {"db": database}).scalar()
        time.sleep(1.5)
    admin.dispose()
    assert terminated > 0
    assert finish(workers) == [0, 0], read_logs(logs)
    assert len(_study(pg_url).get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 6


def test_eight_concurrent_creates_on_an_empty_database(tmp_path: Path, pg_url: str) -> None:
    config = write_config(tmp_path, n_trials=4)
    env = {**os.environ, "ALPA_TUNE_STORAGE": pg_url}
    creators = [subprocess.Popen([sys.executable, "-m", "alpa_tune", "study", "create", str(config)],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(8)]
    results = [c.communicate(timeout=300) for c in creators]
    assert [c.returncode for c in creators] == [0] * 8, [err for _, err in results]
    summaries = optuna.get_all_study_summaries(driver_url(pg_url))
    assert [s.study_name for s in summaries] == ["tiny"]
    waiting = _study(pg_url).get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 3  # the paper's three points, enqueued exactly once


def test_sigterm_fails_the_trial_requeues_it_and_exits_cleanly(tmp_path: Path, pg_url: str) -> None:
    config = write_config(tmp_path, n_trials=2, epochs=6, sampler="random")
    assert cli("study", "create", str(config), "--storage", pg_url).returncode == 0
    log = tmp_path / "w.log"
    worker = start_worker("tiny", pg_url, log=log)
    trial = wait_for(lambda: _running_trial_of(pg_url, worker.pid), 120, "a running trial")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=120) == 0, log.read_text()
    study = _study(pg_url)
    assert study.trials[trial.number].state == TrialState.FAIL
    assert "interrupted" in study.trials[trial.number].user_attrs["fail_reason"]
    queued = [t for t in study.get_trials(states=(TrialState.WAITING,))
              if t.system_attrs.get("failed_trial") == trial.number]
    assert len(queued) == 1 and queued[0].system_attrs["fixed_params"] == trial.params


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://alice:s3cret-pw@no-such-host.invalid:5432/db", "cannot open storage postgresql://alice:***@no-such-host.invalid:5432/db"),
        ("postgresql://postgres:s3cret-pw@127.0.0.1:5432/alpa_no_such_db", 'database "alpa_no_such_db" does not exist'),
        ("postgresql://no_such_role:s3cret-pw@127.0.0.1:5432/postgres", 'role "no_such_role" does not exist'),
        ("mongodb://alice:s3cret-pw@localhost/db", "unknown scheme 'mongodb'"),
    ],
)
def test_bad_storage_urls(tmp_path: Path, pg_server: str, url: str, message: str) -> None:
    config = write_config(tmp_path)
    done = cli("study", "create", str(config), "--storage", url)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "s3cret-pw" not in done.stderr + done.stdout
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


def test_launcher_restarts_a_killed_worker_and_meets_the_budget(tmp_path: Path, pg_url: str) -> None:
    config = write_config(tmp_path, n_trials=4, epochs=4, sampler="random")
    assert cli("study", "create", str(config), "--storage", pg_url).returncode == 0
    env = {**os.environ, "ALPA_TUNE_STORAGE": pg_url, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "alpa_tune", "launch", "tiny", "--workers", "2",
                                 "--log-dir", str(tmp_path / "logs")],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def some_worker_running():
        for trial in _study(pg_url).get_trials(states=(TrialState.RUNNING,)):
            if "progress" in trial.user_attrs:
                return int(trial.user_attrs["worker"].rsplit(":", 1)[1])
        return None

    victim = wait_for(some_worker_running, 120, "a worker running a trial")
    os.kill(victim, signal.SIGKILL)
    output, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, output
    study = _study(pg_url)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
    assert "4/4 finished" in output
    assert "restarted (1) after exit -9" in output
    assert "s3cret" not in output


def test_wrong_password_is_refused_without_showing_it(tmp_path: Path, pg_password_server: str) -> None:
    config = write_config(tmp_path)
    right = cli("study", "create", str(config), "--storage", pg_password_server)
    assert right.returncode == 0, right.stderr
    assert "right-pw" not in right.stdout + right.stderr and "alice:***@" in right.stdout
    wrong_url = pg_password_server.replace("right-pw", "wr0ng-pw")
    wrong = cli("study", "list", "--storage", wrong_url)
    assert wrong.returncode == 2
    assert 'password authentication failed for user "alice"' in wrong.stderr
    assert "wr0ng-pw" not in wrong.stderr + wrong.stdout
    assert wrong.stderr.strip().count("\n") == 0
    # From the environment too, and through a worker.
    env_wrong = cli("worker", "tiny", env={"ALPA_TUNE_STORAGE": wrong_url})
    assert env_wrong.returncode == 2 and "wr0ng-pw" not in env_wrong.stderr + env_wrong.stdout


def test_journal_file_storage_runs_two_workers(tmp_path: Path) -> None:
    config = write_config(tmp_path, n_trials=3, sampler="random")
    url = f"journal:{tmp_path / 'study.journal'}"
    done = cli("run", str(config), "--storage", url, "--workers", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    logs = "".join(p.read_text() for p in (tmp_path / "alpa-tune-out").glob("worker-*.log"))
    assert "lock" not in logs.lower()  # our study lock must not collide with the journal's own lock file
    from alpa_tune.storage import open_storage

    study = optuna.load_study(study_name="tiny", storage=open_storage(url))
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3
