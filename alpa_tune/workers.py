"""The long-lived worker loop: ask for a slot under the budget, train, record the result once.

Budget rule (exact across any number of workers): under the study's lock, a worker starts
a trial only while finished + running < budget; the lock is released as soon as the new
trial exists. A worker whose trial may still fail (and be re-queued) waits instead of leaving.

Faults: every storage call goes through a :class:`~alpa_tune.storage.StorageGuard`, so an
outage shorter than ``workers.storage_patience`` is waited out. Reports made during training
(intermediate values, progress, per-fold figures) that fail are kept and written when the
storage answers again; training goes on. A finished trial's result is recorded by this module
(not by Optuna's ``optimize``, whose ``_run_trial`` crashes when ``tell`` fails: Optuna issue
5280) exactly once, or dropped with one line if the trial was meanwhile failed by its heartbeat
and re-queued for another worker.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState

from alpa_tune.config import MACHINE_LOCAL_KEYS, ConfigError, override_keys
from alpa_tune.objective import Objective
from alpa_tune.search import make_pruner, make_sampler
from alpa_tune.storage import (
    StorageError,
    StorageGuard,
    TrialTakenOver,
    count_trial_states,
    disk_full_error,
    mask_url,
    open_storage,
    running_trials_without_heartbeat,
    storage_errors,
    study_lock,
)
from alpa_tune.study import allocate_rank, backend, finished, load_study, stored_config, study_budget
from alpa_tune.units import is_disk_full

MAX_CONSECUTIVE_FAILURES = 5


@dataclass
class WorkerResult:
    trials_run: int = 0
    stopped_by_signal: bool = False
    budget_met: bool = False
    gave_up: bool = False
    stale_results_dropped: int = 0


def explicit_rank(rank: int | None) -> int | None:
    """``--rank`` wins, then ``$ALPA_TUNE_RANK``; None means: take the next free rank from the study."""
    if rank is not None:
        return rank
    value = os.environ.get("ALPA_TUNE_RANK", "")
    return int(value) if value.isdigit() else None


def run_worker(
    study_name: str,
    url: str,
    *,
    max_trials: int | None = None,
    rank: int | None = None,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] = print,
    install_signal_handlers: bool = True,
) -> WorkerResult:
    """Pull trials until the study's budget is met (or ``max_trials`` of our own ran).

    A full disk under the storage, met anywhere (start-up included), ends it with ``DiskFullError``.
    """
    try:
        return _run_worker(study_name, url, max_trials=max_trials, rank=rank, overrides=overrides, log=log,
                           install_signal_handlers=install_signal_handlers)
    except storage_errors() as exc:
        if is_disk_full(exc):
            raise disk_full_error(url) from None
        raise


def _run_worker(
    study_name: str,
    url: str,
    *,
    max_trials: int | None,
    rank: int | None,
    overrides: Sequence[str],
    log: Callable[[str], None],
    install_signal_handlers: bool,
) -> WorkerResult:
    import torch

    from alpa_tune.data import load_dataset
    from alpa_tune.training import resolve_device

    refused = [key for key in override_keys(list(overrides)) if key not in MACHINE_LOCAL_KEYS]
    if refused:
        raise ConfigError(
            f"--set {refused[0]}: a worker may change only machine-local keys "
            f"({', '.join(sorted(MACHINE_LOCAL_KEYS))}); every worker of a study trains the same way"
        )
    config = stored_config(load_study(study_name, url)).replace(list(overrides))
    torch.set_num_threads(config.training.threads or os.cpu_count() or 1)
    device = resolve_device(config.training.device)
    if device.type == "cpu":
        from alpa_tune.augment import reuse_cpu_memory

        reuse_cpu_memory()  # batch-sized tensors are freed and re-made every step
    dataset = load_dataset(config.data)  # once per process, shared by every trial

    storage = open_storage(url, config.workers)
    startup = StorageGuard(url, config.workers.storage_patience, log=log)
    rank = startup.call(lambda: allocate_rank(optuna.load_study(study_name=study_name, storage=storage), url, rank),
                        "taking a rank")
    study = load_study(study_name, url, storage=storage, sampler=make_sampler(config.search, rank),
                       pruner=make_pruner(config))
    log(f"worker {socket.gethostname()}:{os.getpid()} rank {rank}: study {study_name!r} in {mask_url(url)}, "
        f"device {device}, {len(dataset.labels)} images, {torch.get_num_threads()} thread(s)")
    stop = threading.Event()
    if install_signal_handlers:
        _install_stop_handlers(stop, log)
    objective = Objective(config, dataset, device=device, stop_event=stop)
    return trial_loop(study, url, objective, stop=stop, max_trials=max_trials,
                      max_retries=config.workers.max_retries, patience=config.workers.storage_patience,
                      grace_period=config.workers.grace_period,
                      heartbeat_interval=config.workers.heartbeat_interval,
                      poll=min(2.0, config.workers.heartbeat_interval), log=log, before_record=_test_pause())


PAUSE_ENV = "ALPA_TUNE_TEST_PAUSE_BEFORE_RECORD"


def _test_pause() -> Callable[[optuna.Trial, TrialState, float | None], None] | None:
    """Tests only: with ``$ALPA_TUNE_TEST_PAUSE_BEFORE_RECORD=FLAG``, a worker whose training has
    finished writes FLAG.PID (the trial and its result) and waits while FLAG exists, so a test can
    stop the storage exactly between training and recording."""
    flag = os.environ.get(PAUSE_ENV)
    if not flag:
        return None

    def pause(trial: optuna.Trial, state: TrialState, value: float | None) -> None:
        marker = Path(f"{flag}.{os.getpid()}")
        marker.write_text(json.dumps({"trial": trial.number, "state": state.name, "value": value}))
        while os.path.exists(flag):
            time.sleep(0.1)

    return pause


def trial_loop(
    study: optuna.Study,
    url: str,
    objective: Callable[[Any], float],
    *,
    stop: threading.Event,
    max_trials: int | None = None,
    max_retries: int = 2,
    patience: float = 600.0,
    grace_period: float = 30.0,
    heartbeat_interval: float = 10.0,
    poll: float = 2.0,
    log: Callable[[str], None] = print,
    before_record: Callable[[optuna.Trial, TrialState, float | None], None] | None = None,
) -> WorkerResult:
    """Run trials until the budget is met, ``max_trials`` ran, or ``stop`` is set.

    Raises ``StorageLost`` after an outage longer than ``patience`` and ``DiskFullError`` when
    the storage's disk is full. ``before_record`` (tests) runs between training and recording.
    """
    guard = StorageGuard(url, patience, log=log, stop=stop)
    retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)
    gate = _BudgetGate(study, url, guard, grace_period, retry)
    result = WorkerResult()
    failures = 0
    while not stop.is_set():
        if max_trials is not None and result.trials_run >= max_trials:
            break
        trial = guard.call(gate.next_trial, "asking for a trial", interruptible=True)
        if trial is None:  # stopped while the storage was away
            break
        if trial == "done":
            result.budget_met = True
            break
        if trial == "wait":
            stop.wait(poll)
            continue
        resilient = ResilientTrial(trial, guard)
        with _Heartbeat(study, trial._trial_id, heartbeat_interval, guard):
            state, value, error = _train(objective, resilient)
            if before_record is not None:
                before_record(trial, state, value)
            outcome = _record(study, resilient, state, value, guard)
        result.trials_run += 1
        if outcome == "stale":
            result.stale_results_dropped += 1
            log(f"trial {trial.number} was failed by its heartbeat while this worker could not reach the "
                f"storage and was queued again; dropped this worker's {state.name.lower()} result "
                f"({'value ' + format(value, '.4f') if value is not None else 'no value'})")
            failures = 0
            continue
        if state != TrialState.FAIL:
            failures = 0
            continue
        if stop.is_set():
            # Interrupted, not broken: run it again elsewhere, same params.
            guard.call(lambda: retry(study, backend(study).get_trial(trial._trial_id)), "re-queueing the trial")
            break
        failures += 1
        reason = resilient.user_attrs.get("fail_reason") or f"{type(error).__name__}: {error}"
        log(f"trial {trial.number} failed: {reason}")
        if failures >= MAX_CONSECUTIVE_FAILURES:
            log(f"giving up after {failures} failed trials in a row; the last: {reason}")
            result.gave_up = True
            break
    result.stopped_by_signal = stop.is_set()
    return result


def _train(objective: Callable[[Any], float], trial: ResilientTrial) -> tuple[TrialState, float | None, BaseException | None]:
    """Run the objective; every error but a lost or full storage becomes a FAIL with its reason."""
    from alpa_tune.storage import DiskFullError, StorageLost

    try:
        return TrialState.COMPLETE, float(objective(trial)), None
    except optuna.TrialPruned:
        return TrialState.PRUNED, None, None
    except (StorageLost, DiskFullError):
        raise
    except TrialTakenOver as exc:  # stop training a trial that another worker now runs
        return TrialState.FAIL, None, exc
    except Exception as exc:  # noqa: BLE001 - the trial fails, the worker goes on
        return TrialState.FAIL, None, exc


def _record(study: optuna.Study, trial: ResilientTrial, state: TrialState, value: float | None,
            guard: StorageGuard) -> str:
    """Write the kept reports, then the result, exactly once: "recorded" or "stale".

    A tell whose reply was lost may have been committed: the retry then finds the trial in the
    state it asked for and counts it as recorded. Finding it FAILed otherwise means the heartbeat
    judged it stale and another worker got its retry: the result is not written over that.
    """
    storage = backend(study)
    told = False

    def attempt() -> str:
        nonlocal told
        if told:  # an earlier tell may have been committed before its reply was lost
            current = storage.get_trial(trial._trial_id)
            if current.state != TrialState.RUNNING:
                same = current.state == state and (state != TrialState.COMPLETE or current.value == value)
                return "recorded" if same else "stale"
        try:
            trial.flush()
            told = True
            # Optuna's tell reads the trial first and refuses one that is no longer RUNNING.
            study.tell(trial.wrapped, value if state == TrialState.COMPLETE else None, state=state)
            return "recorded"
        except (TrialTakenOver, ValueError, UpdateFinishedTrialError):
            if storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
                raise
            return "stale"  # failed by a heartbeat check and re-queued for another worker

    return guard.call(attempt, f"recording trial {trial.number}'s result")


class ResilientTrial:
    """An ``optuna.Trial`` whose reports outlive a storage outage.

    ``report`` and ``set_user_attr`` that fail are kept in order and written, oldest first, at
    the next successful write or by ``flush``; ``should_prune`` says no while reports are
    pending (the other trials cannot be seen). Everything else is the wrapped trial's.
    """

    def __init__(self, trial: optuna.Trial, guard: StorageGuard) -> None:
        self._trial = trial
        self._guard = guard
        self._pending: list[tuple[str, Any, Any]] = []
        self._attrs: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trial, name)

    @property
    def wrapped(self) -> optuna.Trial:
        return self._trial

    @property
    def user_attrs(self) -> dict[str, Any]:
        return {**self._trial.user_attrs, **self._attrs}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def suggest_float(self, *args: Any, **kwargs: Any) -> float:
        return self._guard.call(lambda: self._trial.suggest_float(*args, **kwargs), "sampling the trial")

    def suggest_categorical(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard.call(lambda: self._trial.suggest_categorical(*args, **kwargs), "sampling the trial")

    def report(self, value: float, step: int) -> None:
        self._write("report", int(step), float(value))

    def set_user_attr(self, key: str, value: Any) -> None:
        self._attrs[key] = value
        self._write("attr", key, value)

    def should_prune(self) -> bool:
        if self._pending:
            return False
        try:
            return self._trial.should_prune()
        except storage_errors() as exc:
            self._guard.failed(exc, f"checking whether trial {self._trial.number} should be pruned")
            return False

    def flush(self) -> None:
        """Write the kept reports in order; raises the storage's error if it is still away, and
        ``TrialTakenOver`` if the trial was meanwhile failed (by its heartbeat) and re-queued."""
        while self._pending:
            kind, key, value = self._pending[0]
            try:
                if kind == "report":
                    self._trial.report(value, key)
                else:
                    self._trial.set_user_attr(key, value)
            except UpdateFinishedTrialError:
                self._pending.clear()
                raise TrialTakenOver(f"trial {self._trial.number} was finished by another process") from None
            self._pending.pop(0)

    def _write(self, kind: str, key: Any, value: Any) -> None:
        self._pending.append((kind, key, value))
        try:
            self.flush()
        except storage_errors() as exc:
            self._guard.failed(exc, f"reporting trial {self._trial.number}'s progress "
                                    "(training goes on; its reports are kept until the storage is back)")
        else:
            self._guard.succeeded()


class _Heartbeat:
    """Beats for one trial every ``interval`` seconds in a thread, through outages.

    Optuna's heartbeats only run inside ``optimize``; this loop records its own result, so it
    beats itself. A failed beat tells the guard (an outage may fall between two reports, and
    the guard must know of it to hold back stale-trial checks afterwards) and is skipped.
    """

    def __init__(self, study: optuna.Study, trial_id: int, interval: float, guard: StorageGuard) -> None:
        self.storage = backend(study)
        self.trial_id = trial_id
        self.interval = interval
        self.guard = guard
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> _Heartbeat:
        if is_heartbeat_enabled(self.storage):
            self.thread = threading.Thread(target=self._beat, name="alpa-tune-heartbeat", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        # Not joined: a beat still in flight is harmless once the trial is recorded (only RUNNING
        # trials are judged), and waiting for it would put a write on every trial's path.
        self.done.set()

    def _beat(self) -> None:
        from alpa_tune.storage import StorageLost

        while not self.done.is_set():  # the first beat at once: a trial without one is never judged stale
            try:
                self.storage.record_heartbeat(self.trial_id)
            except storage_errors() as exc:
                try:
                    self.guard.failed(exc, "sending heartbeats")
                except (StorageLost, StorageError):
                    pass  # the main thread meets the same fault at its next storage call and stops
            else:
                self.guard.succeeded()
            self.done.wait(self.interval)


class _BudgetGate:
    """Decides, under the study lock, whether this worker may start a trial, and starts it.

    The budget (a study attribute) is read at every decision, so a budget lowered while workers
    run is honoured at once and never overshot.
    """

    def __init__(self, study: optuna.Study, url: str, guard: StorageGuard, grace_period: float,
                 retry: RetryHeartbeatStaleTrialCallback) -> None:
        self.study = study
        self.retry = retry
        self.url = url
        self.guard = guard
        self.grace_period = grace_period
        # A trial that never beat (or never named its worker) is judged after a minute more than
        # the grace period: its first beat may lag its ask on a loaded machine or database.
        self.orphaned_after = grace_period + 60
        self._silent_since: dict[int, float] = {}  # trial id -> when this worker first saw it unbeaten

    def _fail_and_requeue(self, trial_id: int, reason: str) -> None:
        storage = backend(self.study)
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            return  # another worker got there first
        self.retry(self.study, storage.get_trial(trial_id))

    def _fail_trials_that_never_beat(self) -> None:
        """Fail and re-queue the RUNNING trials that have had no heartbeat for as long as this
        worker has watched them, once that is the grace period plus a minute. Timed on this
        worker's own clock: a trial's start time is its creator's local clock, another machine's."""
        now = time.monotonic()
        silent = running_trials_without_heartbeat(backend(self.study), self.study._study_id)
        self._silent_since = {trial_id: self._silent_since.get(trial_id, now) for trial_id in silent}
        for trial_id, since in self._silent_since.items():
            if now - since >= self.orphaned_after:
                self._fail_and_requeue(trial_id, "never sent a heartbeat: its worker died or lost the storage "
                                                 "while starting it; queued again")

    def _fail_trials_of_dead_local_workers(self) -> None:
        """Without heartbeats (journal files, one host), fail and re-queue the RUNNING trials
        whose worker on this host is gone (killed, or stopped by a full disk), and those that
        never named a worker (it died right after asking) once they are older than the grace
        period plus a minute."""
        host = socket.gethostname()
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
            if not pid:
                started = trial.datetime_start
                age = (datetime.datetime.now(started.tzinfo) - started).total_seconds() if started else float("inf")
                if age < self.orphaned_after:
                    continue
            elif worker_host != host or not pid.isdigit() or _process_alive(int(pid)):
                continue
            self._fail_and_requeue(trial._trial_id, f"its worker {host}:{pid or '?'} is gone; queued again")

    def next_trial(self) -> optuna.Trial | str:
        """A new RUNNING trial (already beating), or "done" / "wait"."""
        storage = backend(self.study)
        with study_lock(self.url, self.study.study_name) as connection:
            counts = count_trial_states(storage, self.study._study_id, connection)
            budget = study_budget(self.study, connection)
            if finished(counts) + counts[TrialState.RUNNING] >= budget:
                # Before stopping or waiting: fail the trials of dead workers (heartbeats only
                # do so inside optimize) so their retries get a slot, and confirm the budget.
                # Not right after an outage: live workers need a grace period to beat again.
                if self.guard.settled(self.grace_period):
                    fail_stale_trials(self.study)
                    self._fail_trials_that_never_beat()
                if not is_heartbeat_enabled(storage):
                    self._fail_trials_of_dead_local_workers()
                counts = count_trial_states(storage, self.study._study_id, connection)
                if finished(counts) >= budget:
                    return "done"
                if finished(counts) + counts[TrialState.RUNNING] >= budget:
                    return "wait"  # a running trial may still fail and need a retry
            with warnings.catch_warnings():
                # "Heartbeat ... supposed to be used with Study.optimize": this loop beats itself.
                warnings.simplefilter("ignore", UserWarning)
                # The first heartbeat comes from the trial's heartbeat thread; a worker that dies
                # before it leaves a trial that _fail_trials_that_never_beat fails later.
                return self.study.ask()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _install_stop_handlers(stop: threading.Event, log: Callable[[str], None]) -> None:
    def handle(signum: int, _frame: object) -> None:
        if stop.is_set():
            os._exit(128 + signum)  # second signal: leave now; the heartbeat fails the trial later
        stop.set()
        log(f"{signal.Signals(signum).name}: finishing the current epoch, then stopping (again to quit now)")

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
