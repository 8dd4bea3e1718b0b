"""Hosts that vanish: workers and PostgreSQL on simulated machines whose network goes away.

Each "machine" is a network namespace of its own (tests/netns.py) with its own host name; the
private PostgreSQL serves from one of them, one worker runs in each of the others. A cut is a
real link taken down, so the processes see what a pulled cable does: silence, then TCP
retransmissions until the link is back. Figures of each run are printed (``pytest -s``) and
appended to the test's report.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import cli, finish, read_logs, start_worker, wait_for, write_config
from netns import Host, NetnsUnavailable, Network
from optuna.trial import TrialState

from alpa_tune.storage import open_storage

# Long enough that a cut lands mid-trial (a TINY epoch takes about a second here).
EPOCHS = 3
GRACE_PERIOD = 3  # TINY_CONFIG's workers.grace_period (heartbeat every second)


class Cluster:
    """A bridge, a PostgreSQL host, worker hosts, and the workers started on them."""

    def __init__(self, tmp_path: Path) -> None:
        from pgserver import PrivateServer

        self.tmp_path = tmp_path
        try:
            self.net = Network()
        except NetnsUnavailable as exc:
            pytest.skip(f"network namespaces cannot be made here: {exc}")
        self.server: PrivateServer | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.hosts: dict[str, Host] = {}
        self.figures: dict[str, Any] = {}
        self._storage: Any = None
        try:
            self.db = self.net.add_host("db")
            self.server = PrivateServer(listen=self.db.address, prefix=self.db.exec_prefix)
            self.server.execute("CREATE DATABASE alpa")
        except NetnsUnavailable as exc:
            self.close()
            pytest.skip(f"network namespaces cannot be made here: {exc}")
        except BaseException:
            self.close()
            raise
        # Trust auth on the private server: no password exists to leak.
        self.url = f"postgresql://postgres@{self.db.address}:{self.server.port}/alpa"

    def create_study(self, n_trials: int) -> None:
        config = write_config(self.tmp_path, n_trials=n_trials, epochs=EPOCHS)
        created = cli("study", "create", str(config), env={"ALPA_TUNE_STORAGE": self.url})
        assert created.returncode == 0, created.stdout + created.stderr

    def start_worker(self, label: str, rank: int) -> subprocess.Popen:
        """``alpa-tune worker`` on a host of its own, named ``label`` (its trials' ``worker`` attribute)."""
        host = self.hosts[label] = self.net.add_host(label)
        # Its own host name too, as on a separate machine; the pid stays the worker's (every step execs).
        prefix = [*host.exec_prefix, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', label]
        worker = start_worker("tiny", self.url, "--rank", str(rank), cwd=self.tmp_path,
                              log=self.log_path(label), prefix=prefix)
        self.workers[label] = worker
        return worker

    def worker_id(self, label: str) -> str:
        return f"{label}:{self.workers[label].pid}"

    def log_path(self, label: str) -> Path:
        return self.tmp_path / f"{label}.log"

    def log(self, label: str) -> str:
        return self.log_path(label).read_text(errors="replace")

    def logs(self) -> str:
        codes = ", ".join(f"{label} {w.poll()}" for label, w in self.workers.items())
        return f"exit codes: {codes}\n" + read_logs([self.log_path(label) for label in self.workers])

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        if self._storage is None:
            self._storage = open_storage(self.url)
        return optuna.load_study(study_name="tiny", storage=self._storage).get_trials(deepcopy=False)

    def wait_for(self, what: str, condition: Callable[[list[optuna.trial.FrozenTrial]], Any], timeout: float) -> Any:
        """Poll the study (from the test's own address on the bridge) until ``condition`` holds."""
        def check() -> Any:
            if all(w.poll() is not None for w in self.workers.values()):
                raise AssertionError(f"every worker exited before {what}")  # nobody left to make it happen
            return condition(self.trials())

        try:
            return wait_for(check, timeout, what, interval=0.25)
        except AssertionError as exc:
            pytest.fail(f"{exc}; trials: {describe(self.trials())}\n{self.logs()}")

    def wait_workers(self, timeout: float) -> dict[str, int]:
        codes = dict(zip(self.workers, finish(list(self.workers.values()), timeout)))
        if None in codes.values():
            pytest.fail(f"workers still running {timeout:.0f}s on were killed: {codes}; trials: "
                        f"{describe(self.trials())}\n{self.logs()}")
        return codes

    def close(self) -> list[str]:
        for worker in self.workers.values():
            if worker.poll() is None:
                worker.kill()  # by pid: the worker itself (ip netns exec, unshare and sh exec'd it)
                worker.wait(timeout=30)
        if self.server is not None:
            self.server.close()
        return self.net.close()


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    started = time.monotonic()
    made = Cluster(tmp_path)
    try:
        yield made
    finally:
        errors = made.close()
        made.figures["total_s"] = round(time.monotonic() - started, 1)
        request.node.user_properties.append(("figures", made.figures))
        print(f"\n{request.node.name}: {made.figures}")
        assert not errors, f"tearing the network down failed: {errors}"


def describe(trials: list[optuna.trial.FrozenTrial]) -> str:
    return ", ".join(f"#{t.number} {t.state.name} by {t.user_attrs.get('worker', '-')}"
                     + (f" (retry of #{t.system_attrs['failed_trial']})" if "failed_trial" in t.system_attrs else "")
                     for t in trials)


def running_of(trials: list[optuna.trial.FrozenTrial], worker: str) -> optuna.trial.FrozenTrial | None:
    return next((t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("worker") == worker), None)


def check_budget(trials: list[optuna.trial.FrozenTrial], budget: int) -> Counter:
    states = Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == budget, describe(trials)
    assert states[TrialState.RUNNING] == 0, describe(trials)
    return states


def test_worker_cut_off_mid_trial(cluster: Cluster) -> None:
    """A worker's host drops off the network mid-trial for longer than the grace period, then returns."""
    budget = 3
    cluster.create_study(budget)
    started = time.monotonic()
    cluster.start_worker("lost", rank=0)
    cluster.start_worker("steady", rank=1)
    lost_id, steady_id = cluster.worker_id("lost"), cluster.worker_id("steady")

    first = cluster.wait_for("a trial of the worker to cut off", lambda ts: running_of(ts, lost_id), timeout=120)
    cluster.net.cut(cluster.hosts["lost"])
    cut_at = time.monotonic()
    cluster.figures["cut_after_start_s"] = round(cut_at - started, 1)

    # Off the network until the heartbeat has failed its trial and another worker runs the retry.
    def retried_elsewhere(trials: list[optuna.trial.FrozenTrial]) -> Any:
        original = next(t for t in trials if t.number == first.number)
        retry = next((t for t in trials if t.system_attrs.get("failed_trial") == first.number), None)
        if original.state == TrialState.FAIL and retry is not None and retry.user_attrs.get("worker") == steady_id:
            return retry
        return None

    retry = cluster.wait_for(f"trial {first.number} to be failed and retried by the other worker",
                             retried_elsewhere, timeout=120)
    cluster.net.restore(cluster.hosts["lost"])
    restored_at = time.monotonic()
    cluster.figures["cut_s"] = round(restored_at - cut_at, 1)
    assert restored_at - cut_at > GRACE_PERIOD

    # How long its blocked storage calls take to come back (TCP retransmissions, not keepalives).
    logged = len(cluster.log("lost"))
    while cluster.workers["lost"].poll() is None and len(cluster.log("lost")) == logged \
            and time.monotonic() - restored_at < 150:
        time.sleep(0.25)
    cluster.figures["lost_back_after_restore_s"] = round(time.monotonic() - restored_at, 1)
    codes = cluster.wait_workers(timeout=150)
    cluster.figures["end_after_restore_s"] = round(time.monotonic() - restored_at, 1)
    trials = cluster.trials()
    states = check_budget(trials, budget)
    cluster.figures.update(trials=len(trials), complete=states[TrialState.COMPLETE], failed=states[TrialState.FAIL],
                           retries=sum("failed_trial" in t.system_attrs for t in trials), exit_codes=codes)

    original = next(t for t in trials if t.number == first.number)
    final_retry = next(t for t in trials if t.number == retry.number)
    # The cut-off worker did not write over its old trial or the retry.
    assert original.state == TrialState.FAIL and original.user_attrs.get("worker") == lost_id, describe(trials)
    assert final_retry.state == TrialState.COMPLETE, describe(trials)
    assert final_retry.user_attrs.get("worker") == steady_id, describe(trials)
    # The same point: the original's whole point when it was an enqueued one (a cut between two
    # suggestions leaves only the first ones stored on the original), else its stored params.
    point = original.system_attrs.get("fixed_params", original.params)
    assert final_retry.params == point and original.params.items() <= point.items(), describe(trials)
    assert codes == {"lost": 0, "steady": 0}, cluster.logs()

    # One clear line from the returning worker about the result it dropped.
    lines = [line for line in cluster.log("lost").splitlines()
             if re.search(rf"\btrial #?{first.number}\b", line) and re.search(r"drop|stale|discard", line, re.I)]
    assert len(lines) == 1, f"expected one line about dropping trial {first.number}'s result:\n{cluster.log('lost')}"
    cluster.figures["dropped_line"] = lines[0]
    assert "Traceback" not in cluster.log("lost"), cluster.log("lost")


def test_database_host_cut_off(cluster: Cluster) -> None:
    """The PostgreSQL host's own link goes down for 20 s while three workers train."""
    budget = 6
    outage = 20.0
    cluster.create_study(budget)
    started = time.monotonic()
    labels = ["w0", "w1", "w2"]
    for rank, label in enumerate(labels):
        cluster.start_worker(label, rank=rank)
    ids = [cluster.worker_id(label) for label in labels]
    cluster.wait_for("a running trial on each of the three workers",
                     lambda ts: all(running_of(ts, worker) for worker in ids), timeout=120)
    before = describe(cluster.trials())

    cluster.net.cut_host_side(cluster.db)
    cut_at = time.monotonic()
    cluster.figures["cut_after_start_s"] = round(cut_at - started, 1)
    time.sleep(outage)
    cluster.net.restore(cluster.db)
    restored_at = time.monotonic()
    restored_wall = datetime.now()
    cluster.figures["cut_s"] = round(restored_at - cut_at, 1)

    codes = cluster.wait_workers(timeout=180)
    cluster.figures["end_after_restore_s"] = round(time.monotonic() - restored_at, 1)
    trials = cluster.trials()
    states = check_budget(trials, budget)
    cluster.figures.update(trials=len(trials), complete=states[TrialState.COMPLETE], failed=states[TrialState.FAIL],
                           retries=sum("failed_trial" in t.system_attrs for t in trials), exit_codes=codes,
                           running_at_cut=before,
                           completed_after_restore_s=sorted(round((t.datetime_complete - restored_wall).total_seconds(), 1)
                                                            for t in trials if t.datetime_complete and t.datetime_complete > restored_wall))
    assert codes == dict.fromkeys(labels, 0), cluster.logs()
    for label in labels:
        assert "Traceback" not in cluster.log(label), cluster.log(label)


_HOLD_THE_STUDY_LOCK = """
import sys, time
from alpa_tune.storage import study_lock
with study_lock(sys.argv[1], "tiny"):
    print("locked", flush=True)
    time.sleep(3600)
"""


def test_a_worker_cut_off_inside_the_study_lock_does_not_hold_it_for_ever(cluster: Cluster) -> None:
    """A host whose link goes down while its worker holds the study lock (count and ask): the
    server ends that session on its keepalives and the other workers go on, instead of waiting
    for the default two hours."""
    holder_host = cluster.hosts["holder"] = cluster.net.add_host("holder")
    holder = subprocess.Popen([*holder_host.exec_prefix, sys.executable, "-c", _HOLD_THE_STUDY_LOCK, cluster.url],
                              stdout=subprocess.PIPE, text=True)
    cluster.workers["holder"] = holder  # killed by the fixture's close
    try:
        assert holder.stdout.readline().strip() == "locked"
        cluster.net.cut(holder_host)
        cut_at = time.monotonic()
        # From the test's own address: the same study lock, through a session of its own.
        taker = subprocess.run(
            [sys.executable, "-c", "import sys; from alpa_tune.storage import study_lock\n"
             "with study_lock(sys.argv[1], 'tiny'): print('taken')", cluster.url],
            capture_output=True, text=True, timeout=240)
        waited = time.monotonic() - cut_at
        cluster.figures["lock_taken_after_cut_s"] = round(waited, 1)
        assert taker.returncode == 0 and taker.stdout.strip() == "taken", taker.stderr[-2000:]
        assert 20 < waited < 150, waited  # it waited on the cut holder, then the server let go
        assert holder.poll() is None  # the holder never released it: the server did
    finally:
        cluster.net.restore(holder_host)
