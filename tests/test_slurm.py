"""The SLURM path for real: a one-node cluster (deploy/slurm-local/) runs deploy/slurm-array.sbatch.

Debian's slurm-wlm and munge (.ci/run installs them); the daemons run in a temporary folder,
without systemd, and are stopped by pid at the end whatever happened.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from conftest import cli, wait_for, write_config
from optuna.trial import TrialState

from alpa_tune.storage import driver_url

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "deploy" / "slurm-array.sbatch"
LOCAL = REPO / "deploy" / "slurm-local"
TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol", "sinfo", "squeue")
DAEMON_PIDFILES = ("slurmd.pid", "slurmctld.pid", "munge/munged.pid")
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "DEADLINE", "BOOT_FAIL"}
# One CPU and 1 GB per task: the template's GPU header lines, overridden on the command line only.
CPU_FLAGS = ("--gres=none", "--cpus-per-task=1", "--mem=1G")


def _unavailable() -> str | None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"SLURM binaries missing ({', '.join(missing)}): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "the local SLURM cluster is started as root here (slurmd runs jobs as their user)"
    if sys.prefix == sys.base_prefix:
        return "the jobs activate the test's virtual environment (ALPA_TUNE_VENV): run pytest from one"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ours(pid: int, folder: Path) -> bool:
    """Is ``pid`` still a process of the cluster in ``folder``? (up.sh marks them in their environment)"""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"ALPA_SLURM_LOCAL={folder}".encode() in environ


@dataclass
class Cluster:
    folder: Path
    env: dict[str, str]

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(args, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout)

    def daemon_logs(self) -> str:
        parts = ["--- squeue\n" + self.run("squeue", "-t", "all", "-r").stdout]
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.folder / "log" / name
            if path.exists():
                parts.append(f"--- {name} (last 30 lines)\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(parts)


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[Cluster]:
    reason = _unavailable()
    if reason:
        if os.environ.get("CI") == "true":  # .ci/run installs the packages: a skip there would hide a break
            pytest.fail(reason)
        pytest.skip(reason)
    folder = Path(tempfile.mkdtemp(prefix="alpa-slurm-"))  # short: munge's socket path must fit 108 bytes
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    ports = {"SLURMCTLD_PORT": str(_free_port()), "SLURMD_PORT": str(_free_port())}
    started = time.monotonic()
    up = subprocess.run([str(LOCAL / "up.sh"), str(folder)], env={**env, **ports}, capture_output=True,
                        text=True, timeout=120)
    cluster = Cluster(folder, env)
    try:
        assert up.returncode == 0, f"up.sh failed:\n{up.stdout}{up.stderr}\n{cluster.daemon_logs()}"
        print(f"\nSLURM cluster up in {time.monotonic() - started:.2f} s: {up.stdout.strip()}")
        daemons = {name: int((folder / name).read_text()) for name in DAEMON_PIDFILES}
        assert all(_ours(pid, folder) for pid in daemons.values()), daemons  # what teardown looks for
        yield cluster
    finally:
        stopping = time.monotonic()
        down = subprocess.run([str(LOCAL / "down.sh"), str(folder)], env=env, capture_output=True, text=True,
                              timeout=180)
        print(f"\nSLURM cluster down in {time.monotonic() - stopping:.2f} s")
        survivors = []
        for name in DAEMON_PIDFILES:  # down.sh stops them; make sure, by pid, whatever it did
            path = folder / name
            if path.exists() and _ours(pid := int(path.read_text()), folder):
                survivors.append(f"{name}={pid}")
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)
        assert down.returncode == 0 and not survivors, (
            f"down.sh left daemons running ({survivors}):\n{down.stdout}{down.stderr}")


@pytest.fixture
def slurm(slurm_cluster: Cluster) -> Iterator[Cluster]:
    """The module's cluster; a test's jobs still queued or running at its end are cancelled."""
    yield slurm_cluster
    slurm_cluster.run("scancel", f"--user={getpass.getuser()}")


def _study(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=driver_url(url))


def _create(folder: Path, url: str, name: str, *, epochs: int, n_trials: int) -> None:
    result = cli("study", "create", str(write_config(folder, name, epochs=epochs, n_trials=n_trials)),
                 "--storage", url)
    assert result.returncode == 0, result.stdout + result.stderr


def _job_env(url: str, folder: Path) -> dict[str, str]:
    """What sbatch passes on to the tasks (it exports the submitting environment)."""
    return {"ALPA_TUNE_STORAGE": url, "ALPA_TUNE_VENV": sys.prefix, "ALPA_TUNE_DEVICE": "cpu",
            "ALPA_TUNE_CACHE": str(folder / "cache"), "OMP_NUM_THREADS": "1"}


def _submit(slurm: Cluster, folder: Path, url: str, study: str, *flags: str) -> str:
    result = slurm.run("sbatch", "--parsable", f"--chdir={folder}", *flags, str(TEMPLATE), study,
                       env=_job_env(url, folder))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().split(";")[0]


def _tasks(slurm: Cluster, job: str) -> dict[str, dict[str, str]]:
    """``{"JOB_TASK": scontrol's fields}`` for each task of an array job."""
    out = slurm.run("scontrol", "-o", "show", "job", job).stdout
    tasks = {}
    for line in out.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        tasks[f"{fields.get('ArrayJobId', fields.get('JobId'))}_{fields.get('ArrayTaskId', '')}"] = fields
    return tasks


def _wait_for_job(slurm: Cluster, job: str, count: int, timeout: float, details) -> dict[str, dict[str, str]]:
    """Each task's fields as it ended (kept here: slurmctld forgets a task MinJobAge after it ends)."""
    seen: dict[str, dict[str, str]] = {}

    def ended():
        seen.update((task, fields) for task, fields in _tasks(slurm, job).items() if fields["JobState"] in ENDED)
        return seen if len(seen) == count else None

    return wait_for(ended, timeout, f"job {job} to end", interval=0.25, details=details)


def _logs(slurm: Cluster, folder: Path) -> str:
    logs = [f"--- {p.name}\n{p.read_text()}" for p in sorted(folder.glob("alpa-tune-*.log"))]
    return "\n".join(logs) + "\n" + slurm.daemon_logs()


def _running_trial_of(url: str, study: str, task: str) -> optuna.trial.FrozenTrial | None:
    for trial in _study(url, study).get_trials(states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("slurm_task") == task and "epoch" in trial.user_attrs.get("progress", ""):
            return trial
    return None


def _summary(trials: list[optuna.trial.FrozenTrial]) -> str:
    """'4 trials (COMPLETE 3, FAIL 1), 1 retry; by task {...}' for the measurements printed with -s."""
    states: dict[str, int] = {}
    tasks: dict[str, int] = {}
    for trial in trials:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
        tasks[trial.user_attrs.get("slurm_task", "-")] = tasks.get(trial.user_attrs.get("slurm_task", "-"), 0) + 1
    retries = sum("failed_trial" in t.system_attrs for t in trials)
    return f"{len(trials)} trials ({', '.join(f'{k} {v}' for k, v in sorted(states.items()))}), " \
           f"{retries} retr{'y' if retries == 1 else 'ies'}, by task {tasks}"


def _requeued(study: optuna.Study, failed: optuna.trial.FrozenTrial) -> list[optuna.trial.FrozenTrial]:
    """The trials Optuna's retry callback queued in place of ``failed`` (same params)."""
    return [t for t in study.trials if t.system_attrs.get("failed_trial") == failed.number]


def test_array_of_two_cpu_tasks_meets_the_budget_exactly(slurm: Cluster, pg_url: str, tmp_path: Path) -> None:
    _create(tmp_path, pg_url, "slurm_budget", epochs=10, n_trials=4)
    started = time.monotonic()
    try:
        result = slurm.run("sbatch", "--wait", "--parsable", f"--chdir={tmp_path}", "--array=0-1", *CPU_FLAGS,
                           str(TEMPLATE), "slurm_budget", env=_job_env(pg_url, tmp_path), timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("sbatch --wait still waiting after 180 s\n" + _logs(slurm, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr + _logs(slurm, tmp_path)
    job = result.stdout.strip().split(";")[0]
    trials = _study(pg_url, "slurm_budget").trials
    print(f"\nbudget: {_summary(trials)} in {time.monotonic() - started:.1f} s "
          "(sbatch --wait)")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4, _logs(slurm, tmp_path)
    assert {t.user_attrs["slurm_task"] for t in trials} == {f"{job}_0", f"{job}_1"}, _logs(slurm, tmp_path)
    assert {t.user_attrs["device"] for t in trials} == {"cpu"}
    assert len({t.user_attrs["worker"] for t in trials}) == 2


def test_scancel_mid_trial_requeues_it_and_the_other_task_finishes_the_budget(
        slurm: Cluster, pg_url: str, tmp_path: Path) -> None:
    _create(tmp_path, pg_url, "slurm_cancel", epochs=16, n_trials=3)
    started = time.monotonic()
    job = _submit(slurm, tmp_path, pg_url, "slurm_cancel", "--array=0-1", *CPU_FLAGS)
    details = lambda: _logs(slurm, tmp_path)  # noqa: E731
    victim = wait_for(lambda: _running_trial_of(pg_url, "slurm_cancel", f"{job}_1"), 120,
                      f"a running trial of task {job}_1", interval=0.25, details=details)
    cancel = slurm.run("scancel", f"{job}_1")  # SIGTERM to the task, SIGKILL only after KillWait
    assert cancel.returncode == 0, cancel.stderr
    tasks = _wait_for_job(slurm, job, 2, 180, details)
    ended = time.monotonic() - started
    study = _study(pg_url, "slurm_cancel")
    print(f"\nscancel: trial {victim.number} cancelled at {victim.user_attrs['progress']}; "
          f"{_summary(study.trials)}; job ended {ended:.1f} s after submission")

    assert tasks[f"{job}_1"]["JobState"] == "CANCELLED", details()
    assert (tasks[f"{job}_0"]["JobState"], tasks[f"{job}_0"]["ExitCode"]) == ("COMPLETED", "0:0"), details()
    failed = study.trials[victim.number]
    assert failed.state == TrialState.FAIL, details()
    assert "interrupted" in failed.user_attrs["fail_reason"]
    retried = _requeued(study, failed)
    assert len(retried) == 1 and retried[0].params == failed.params, details()
    assert retried[0].state == TrialState.COMPLETE
    assert retried[0].user_attrs["slurm_task"] == f"{job}_0"  # the task still running took it over
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 3 and states.count(TrialState.FAIL) == 1, details()
    assert "SIGTERM: finishing the current epoch" in (tmp_path / f"alpa-tune-{job}_1.log").read_text()


def test_time_limit_signal_requeues_the_trial_before_the_limit(slurm: Cluster, pg_url: str, tmp_path: Path) -> None:
    # A trial far longer than the job may run. slurmctld checks time limits every 30 s and sends
    # the --signal once fewer than its seconds + 30 are left: TERM@10 of a 1-minute limit arrives
    # 20-50 s after the start (the worker is training by then), a check or more before the limit.
    _create(tmp_path, pg_url, "slurm_timeout", epochs=2000, n_trials=1)
    started = time.monotonic()
    job = _submit(slurm, tmp_path, pg_url, "slurm_timeout", "--array=0", "--time=1", "--signal=B:TERM@10",
                  *CPU_FLAGS)
    details = lambda: _logs(slurm, tmp_path)  # noqa: E731
    task = _wait_for_job(slurm, job, 1, 150, details)[f"{job}_0"]
    log = (tmp_path / f"alpa-tune-{job}_0.log").read_text()
    run_time = task["RunTime"]
    study = _study(pg_url, "slurm_timeout")
    print(f"\ntime limit: the worker stopped after {run_time} of a 1-minute limit; {_summary(study.trials)}; "
          f"{time.monotonic() - started:.1f} s after submission")

    # Ended by the worker itself (exit 0) after the signal, not by the limit (that is TIMEOUT).
    assert (task["JobState"], task["ExitCode"]) == ("COMPLETED", "0:0"), details()
    assert "SIGTERM: finishing the current epoch" in log and "TIME LIMIT" not in log, details()
    failed = study.trials[0]
    assert failed.state == TrialState.FAIL and "interrupted" in failed.user_attrs["fail_reason"], details()
    retried = _requeued(study, failed)
    assert len(retried) == 1 and retried[0].params == failed.params
    assert retried[0].state == TrialState.WAITING  # for the next worker of the study
