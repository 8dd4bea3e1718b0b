"""Ordinary faults on real parts: a PostgreSQL server restarted under running workers, a disk
that fills up during a run, a torn journal, two launchers on one study."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import cli, dump_stacks, finish, read_logs, start_worker, wait_for, write_config
from optuna.trial import TrialState

from alpa_tune.storage import open_storage


def _study(url: str, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url, read_only=True))


def _configure(folder: Path, *, n_trials: int, epochs: int, patience: int = 120) -> Path:
    config = write_config(folder, n_trials=n_trials, epochs=epochs, sampler="random")
    config.write_text(config.read_text() + f"storage_patience = {patience}\n")
    return config


def _pg_database(server, name: str = "alpa") -> str:
    server.execute(f'CREATE DATABASE "{name}"')
    return server.admin_url(name)


# ---------------------------------------------------------------- PostgreSQL restarted


def test_postgres_restart_during_training_is_waited_out(tmp_path: Path, private_pg) -> None:
    url = _pg_database(private_pg)
    config = _configure(tmp_path, n_trials=4, epochs=4)
    assert cli("study", "create", str(config), "--storage", url).returncode == 0
    logs = [tmp_path / f"w{r}.log" for r in range(2)]
    workers = [start_worker("tiny", url, log=logs[r]) for r in range(2)]

    def both_training() -> bool:
        running = _study(url).get_trials(states=(TrialState.RUNNING,))
        return len([t for t in running if "progress" in t.user_attrs]) == 2

    wait_for(both_training, 180, "both workers training")
    private_pg.stop()
    time.sleep(5)  # longer than the grace period (3 s): heartbeats and reports fail meanwhile
    private_pg.start()
    assert finish(workers) == [0, 0], read_logs(logs)

    study = _study(url)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 4, states
    assert TrialState.RUNNING not in states
    text = read_logs(logs)
    assert text.count("storage unreachable") >= 1 and "storage is back" in text, text
    assert "Traceback" not in text
    # Workers that beat again after the outage are not judged stale: nothing was lost or re-run.
    assert TrialState.FAIL not in states, text
    # Every finished trial has its per-fold figures, written after the outage if need be.
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        assert len(trial.user_attrs["fold_balanced_accuracy"]) == 2
        assert sorted(trial.intermediate_values) == [0, 1]


def test_postgres_restart_between_training_and_recording_keeps_the_result(tmp_path: Path, private_pg) -> None:
    url = _pg_database(private_pg)
    config = _configure(tmp_path, n_trials=3, epochs=2)
    assert cli("study", "create", str(config), "--storage", url).returncode == 0
    flag = tmp_path / "pause"
    flag.write_text("")
    logs = [tmp_path / f"w{r}.log" for r in range(2)]
    env = {"ALPA_TUNE_TEST_PAUSE_BEFORE_RECORD": str(flag)}
    workers = [_worker_with_env("tiny", url, env, logs[r]) for r in range(2)]
    markers = wait_for(lambda: sorted(tmp_path.glob("pause.*")), 180, "a worker paused before recording")
    paused = json.loads(markers[0].read_text())
    private_pg.stop()
    flag.unlink()  # the paused workers now try to record while the server is down
    time.sleep(4)
    private_pg.start()
    assert finish(workers) == [0, 0], read_logs(logs)

    study = _study(url)
    trial = study.trials[paused["trial"]]
    assert trial.state.name == paused["state"] == "COMPLETE"
    assert trial.value == pytest.approx(paused["value"])  # the result computed before the outage, kept
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 3 and TrialState.RUNNING not in states, states
    text = read_logs(logs)
    # The first to notice says it once (the heartbeat thread or the record itself), then it is back.
    assert "storage unreachable" in text and "storage is back" in text, text
    assert "invalid data in the commit" not in text  # the driver's reason, not Optuna's wrapper
    assert "Traceback" not in text


def test_worker_gives_up_after_the_storage_patience(tmp_path: Path, private_pg) -> None:
    url = _pg_database(private_pg)
    config = _configure(tmp_path, n_trials=2, epochs=6, patience=4)
    assert cli("study", "create", str(config), "--storage", url).returncode == 0
    log = tmp_path / "w.log"
    worker = start_worker("tiny", url, log=log)
    wait_for(lambda: any("progress" in t.user_attrs for t in _study(url).get_trials(states=(TrialState.RUNNING,))),
              180, "a running trial")
    private_pg.stop()
    try:
        code = worker.wait(timeout=180)
    finally:
        private_pg.start()
    assert code == 4, log.read_text()
    last = [line for line in log.read_text().splitlines() if line.strip()][-1]
    assert last.startswith("error: storage ") and "unreachable for" in last and "storage_patience" in last
    assert "Traceback" not in log.read_text()


def _worker_with_env(study: str, url: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    full = {**os.environ, "ALPA_TUNE_STORAGE": url, "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen([sys.executable, "-m", "alpa_tune", "worker", study, "--threads", "1"],
                            env=full, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


# ---------------------------------------------------------------- a disk that fills up


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 80 MB tmpfs (root only), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Fill the filesystem under ``folder`` to the last byte."""
    filler = folder / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)
    subprocess.run(["dd", "if=/dev/zero", f"of={folder / 'filler2'}", "bs=4k"], capture_output=True)
    return filler


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_disk_that_fills_up_during_a_run_stops_it_with_one_line(tmp_path: Path, small_disk: Path, kind: str) -> None:
    config = _configure(tmp_path, n_trials=40, epochs=1)
    store = small_disk / ("study.db" if kind == "sqlite" else "study.journal")
    url = f"sqlite:///{store}" if kind == "sqlite" else f"journal:{store}"
    run = subprocess.Popen([sys.executable, "-m", "alpa_tune", "run", str(config), "--storage", url, "--workers", "2",
                            "--out", str(tmp_path / "out")], cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def logs() -> str:
        return read_logs(sorted((tmp_path / "out").glob("*.log")))

    def first_trial_finished() -> bool:
        if run.poll() is not None:  # say why at once instead of waiting out the timeout
            raise AssertionError(f"run exited {run.returncode} before a first trial finished:\n"
                                 + "".join(run.communicate()) + logs())
        return store.exists() and _finished(url) >= 1

    def where_it_stalled() -> str:
        dump_stacks()  # into the worker logs and the run's stderr
        run.kill()
        return "".join(run.communicate()) + logs()

    wait_for(first_trial_finished, 240, "a first finished trial", details=where_it_stalled)
    _fill(small_disk)
    try:
        out, err = run.communicate(timeout=240)  # prompt: no endless retrying
    except subprocess.TimeoutExpired:
        raise AssertionError("run kept going on a full disk:\n" + where_it_stalled()) from None
    assert run.returncode == 5, out + err
    assert f"storage {store}: the disk is full (" in err and " free)" in err, err
    assert "Traceback" not in out + err
    assert "invalid data in the commit" not in out + err + logs()

    # Nothing stored is damaged: with space again, the same study reads and resumes.
    for filler in small_disk.glob("filler*"):
        filler.unlink()
    before = _finished(url)
    assert before >= 1
    show = cli("study", "show", "tiny", "--storage", url)
    assert show.returncode == 0, show.stderr
    again = cli("run", str(config), "--storage", url, "--workers", "1", "--trials", str(before + 1), "--lower-budget",
                "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert _finished(url) == before + 1


def _finished(url: str) -> int:
    try:
        return len(_study(url).get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))
    except Exception:  # noqa: BLE001 - the study may not exist yet
        return 0


def test_a_full_output_folder_is_refused_before_any_work(tmp_path: Path, small_disk: Path) -> None:
    config = _configure(tmp_path, n_trials=1, epochs=1)
    _fill(small_disk)
    done = cli("run", str(config), "--out", str(small_disk / "out"), cwd=tmp_path)
    assert done.returncode in (2, 5), done.stderr
    line = done.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("error: "), line
    assert str(small_disk / "out") in line and "0 B" not in line.split("needed")[-1]
    assert not (tmp_path / "alpa-tune.db").exists()  # no study was created


# ---------------------------------------------------------------- journal files


def test_a_torn_journal_is_repaired_before_anything_is_appended(tmp_path: Path) -> None:
    config = _configure(tmp_path, n_trials=2, epochs=1)
    journal = tmp_path / "study.journal"
    url = f"journal:{journal}"
    assert cli("study", "create", str(config), "--storage", url).returncode == 0
    intact = journal.read_bytes()
    with open(journal, "ab") as handle:
        handle.write(b'{"op_code":5,"worker_id":"cut-')  # a crash in the middle of a record

    show = cli("study", "show", "tiny", "--storage", url)
    assert show.returncode == 0, show.stderr
    assert journal.read_bytes().endswith(b"cut-")  # a read-only command changes nothing

    done = cli("run", str(config), "--storage", url, "--workers", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "last record was cut short" in done.stdout + done.stderr
    copies = list(tmp_path.glob("study.journal.torn-*"))
    assert len(copies) == 1 and copies[0].read_bytes().endswith(b"cut-")
    assert journal.read_bytes().startswith(intact)
    for line in journal.read_bytes().splitlines():
        assert json.loads(line)["op_code"] is not None  # every record whole
    assert _finished(url) == 2
    assert cli("study", "show", "tiny", "--storage", url).returncode == 0


def test_a_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    config = _configure(tmp_path, n_trials=1, epochs=1)
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list\nmilk\n")
    for args in (["study", "create", str(config)], ["study", "show", "tiny"], ["run", str(config)]):
        done = cli(*args, "--storage", f"journal:{notes}", cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == f"error: storage journal:{notes}: not an Optuna journal (its first line is " \
                                      "not a journal record); choose another file"
    assert notes.read_text() == "shopping list\nmilk\n"


# ---------------------------------------------------------------- two launchers, one study


def test_two_runs_on_one_sqlite_file_never_train_the_same_point_twice(tmp_path: Path) -> None:
    config = _configure(tmp_path, n_trials=6, epochs=1)
    config.write_text(config.read_text().replace("[search]\n", "[search]\nenqueue_paper_points = false\n"))
    runs = [subprocess.Popen([sys.executable, "-m", "alpa_tune", "run", str(config), "--workers", "2",
                              "--out", str(tmp_path / f"out{i}")], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for i in range(2)]
    outputs = [r.communicate(timeout=600)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outputs
    study = _study(f"sqlite:///{tmp_path / 'alpa-tune.db'}")
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 6
    points = [tuple(sorted(t.params.items())) for t in study.trials if t.params]
    assert len(points) == len(set(points)), points
    logs = "".join(p.read_text() for i in range(2) for p in (tmp_path / f"out{i}").glob("worker-*.log"))
    ranks = [int(line.split(" rank ")[1].split(":")[0]) for line in logs.splitlines() if " rank " in line]
    assert len(ranks) == 4 and sorted(ranks) == [0, 1, 2, 3], ranks


# ---------------------------------------------------------------- bad input: one line, exit 2, before any work


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "{config}", "--gpus", "7"], "error: --gpus 7: no GPU 7 on this machine (visible GPUs: none)"),
        (["run", "{config}", "--gpus", "abc"], "error: --gpus 'abc': expected comma-separated indices such as 0,1"),
        (["launch", "tiny", "--gpus", "0"], "error: --gpus 0: no GPU 0 on this machine (visible GPUs: none)"),
        (["run", "{config}", "--workers", "zero"], "error: Invalid value for '--workers': Input should be a valid integer"),
        (["run"], "error: Missing argument 'CONFIG'."),
        (["worker", "tiny", "--no-such-flag"], "error: No such option: --no-such-flag"),
    ],
)
def test_bad_flags_are_one_line_before_any_work(tmp_path: Path, args: list[str], expected: str) -> None:
    config = _configure(tmp_path, n_trials=1, epochs=1)
    done = cli(*[a.format(config=config) for a in args], cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith(expected), done.stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: alpa-tune ")), done.stderr
    assert "Traceback" not in done.stderr and "╭" not in done.stderr
    assert not (tmp_path / "alpa-tune.db").exists()  # no study, no storage file


@pytest.mark.parametrize("command", [["study", "list"], ["study", "show", "tiny"], ["export", "tiny"],
                                     ["report", "tiny"], ["dashboard", "--port", "8799"]])
def test_read_only_commands_never_create_a_storage_file(tmp_path: Path, command: list[str]) -> None:
    for url, path in ((f"sqlite:///{tmp_path / 'missing.db'}", tmp_path / "missing.db"),
                      (f"journal:{tmp_path / 'missing.journal'}", tmp_path / "missing.journal")):
        done = cli(*command, "--storage", url, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == f"error: storage {url}: {path} does not exist (nothing to read; check " \
                                      "--storage or $ALPA_TUNE_STORAGE)"
        assert not path.exists()


# A worker frozen between a parameter's INSERT and its COMMIT: to the server the same as a worker
# whose link was cut there (no more packets). The INSERT's foreign key locks the trial's row.
_HOLD_A_TRIAL_ROW = """
import os, signal, sys
import sqlalchemy
from alpa_tune.storage import open_storage
storage = open_storage(sys.argv[1])
connection = storage.engine.connect()
connection.execute(sqlalchemy.text(
    "INSERT INTO trial_params (trial_id, param_name, param_value, distribution_json) "
    "VALUES (:trial, 'alpha', 1.0, '{}')"), {"trial": int(sys.argv[2])})
print("held", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_a_worker_frozen_inside_a_transaction_does_not_block_the_study(pg_url: str) -> None:
    """Failing a trial whose worker froze mid-transaction (the stale-trial check) waits for the
    server to end that session (idle_in_transaction_session_timeout), not for ever."""
    import sqlalchemy

    from alpa_tune.storage import IDLE_IN_TRANSACTION_TIMEOUT_S

    # Our own statements give up after 90 s, so a regression fails here instead of hanging.
    storage = open_storage(f"{pg_url}?options=-c%20statement_timeout%3D90000")
    study = optuna.create_study(study_name="frozen", storage=storage)
    trial_id = storage.create_new_trial(study._study_id)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_A_TRIAL_ROW, pg_url, str(trial_id)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with storage.engine.connect() as connection:
            idle = connection.execute(sqlalchemy.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'idle in transaction'")).scalar()
        assert idle == 1  # the frozen worker's session holds the row

        started = time.monotonic()
        failed = storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        waited = time.monotonic() - started
        assert failed and storage.get_trial(trial_id).state == TrialState.FAIL
        # It did wait on the lock (the test sees the fault), and only as long as the timeout.
        assert IDLE_IN_TRANSACTION_TIMEOUT_S - 5 < waited < IDLE_IN_TRANSACTION_TIMEOUT_S + 30, waited
        assert holder.poll() is None  # still frozen: the server, not the worker, ended its session
    finally:
        holder.kill()  # SIGKILL works on a stopped process
        holder.wait(timeout=30)


def test_sigusr1_writes_a_workers_stacks_to_its_log_and_it_goes_on(tmp_path: Path) -> None:
    """A worker that seems stuck shows where (``kill -USR1``) without losing its trial."""
    config = _configure(tmp_path, n_trials=2, epochs=4)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert cli("study", "create", str(config), "--storage", url).returncode == 0
    log = tmp_path / "w.log"
    worker = start_worker("tiny", url, log=log)
    wait_for(lambda: any("progress" in t.user_attrs for t in _study(url).get_trials(states=(TrialState.RUNNING,))),
             180, "a trial in training", details=lambda: read_logs([log]))
    worker.send_signal(signal.SIGUSR1)
    assert worker.wait(timeout=300) == 0, read_logs([log])
    text = log.read_text()
    assert "most recent call first" in text and "alpa_tune/workers.py" in text, text
    assert "Thread 0x" in text  # every thread, the heartbeat's too
    assert len(_study(url).get_trials(states=(TrialState.COMPLETE,))) == 2
    assert not [t for t in _study(url).trials if t.state == TrialState.FAIL]


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed_and_run_again(tmp_path: Path) -> None:
    """A worker that dies between its ``ask`` and its first heartbeat (its disk full, its link
    cut) leaves a RUNNING trial that Optuna's stale check never judges. It used to hold its slot
    for ever: a study one trial short of its budget waited on it without end."""
    config = _configure(tmp_path, n_trials=2, epochs=1)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert cli("study", "create", str(config), "--storage", url).returncode == 0
    orphan = optuna.load_study(study_name="tiny", storage=open_storage(url)).ask()  # then "dies": never beats
    started = time.monotonic()
    done = cli("run", str(config), "--storage", url, "--workers", "1", "--out", str(tmp_path / "out"),
               cwd=tmp_path, timeout=400)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr + read_logs(sorted((tmp_path / "out").glob("*.log")))
    trials = _study(url).trials
    assert trials[orphan.number].state == TrialState.FAIL
    assert "never sent a heartbeat" in trials[orphan.number].user_attrs["fail_reason"]
    # Queued again with the same paper point (run when the budget has room, like any retry).
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retry) == 1 and retry[0].state in (TrialState.WAITING, TrialState.COMPLETE)
    assert retry[0].system_attrs["fixed_params"] == trials[orphan.number].system_attrs["fixed_params"]
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 2  # the budget, exactly
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert took >= 63, took  # judged after the grace period (3 s) plus a minute of silence, not sooner
