"""The long-lived worker loop, and the launcher that starts and supervises workers on one machine.

Budget rule (exact across any number of workers): under the study's lock, a worker starts
a trial only while finished + running < budget; the lock is released as soon as the new
trial exists. A worker whose trial may still fail (and be re-queued) waits instead of leaving.
"""

from __future__ import annotations

import contextlib
import os
import socket
import zlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.exceptions import StorageInternalError
from sqlalchemy.exc import SQLAlchemyError
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from alpa_tune.config import MACHINE_LOCAL_KEYS, ConfigError, override_keys
from alpa_tune.search import (
    Objective,
    make_pruner,
    make_sampler,
    stored_config,
    study_budget,
)
from alpa_tune.storage import ENV_VAR, count_trial_states, mask_text, mask_url, open_storage, study_lock

MAX_CONSECUTIVE_FAILURES = 5
MAX_STORAGE_ERRORS = 8
STORAGE_ERRORS: tuple[type[Exception], ...] = (SQLAlchemyError, StorageInternalError, OSError)
EXIT_BAD_INPUT = 2
EXIT_GAVE_UP = 3


class StudyNotFound(LookupError):
    pass


@dataclass
class WorkerResult:
    trials_run: int = 0
    stopped_by_signal: bool = False
    budget_met: bool = False
    gave_up: bool = False


def load_study(name: str, url: str, **kwargs) -> optuna.Study:
    storage = kwargs.pop("storage", None) or open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage, **kwargs)
    except KeyError:
        raise StudyNotFound(f"study {name!r} does not exist in storage {mask_url(url)}") from None


def default_rank() -> int:
    """A rank for a worker started without --rank: the scheduler's index, else unique per host:pid.

    Replicas started alike (compose --scale, a Kubernetes Job) must not share a sampler seed.
    """
    for variable in ("ALPA_TUNE_RANK", "SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"):
        value = os.environ.get(variable, "")
        if value.isdigit():
            return int(value)
    return zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) % 100_000


def finished(counts: dict[TrialState, int]) -> int:
    return counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]


def run_worker(
    study_name: str,
    url: str,
    *,
    max_trials: int | None = None,
    rank: int = 0,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] = print,
    install_signal_handlers: bool = True,
) -> WorkerResult:
    """Pull trials until the study's budget is met (or ``max_trials`` of our own ran)."""
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
    study = load_study(study_name, url, storage=storage, sampler=make_sampler(config.search, rank),
                       pruner=make_pruner(config))
    log(f"worker {socket.gethostname()}:{os.getpid()} rank {rank}: study {study_name!r} in {mask_url(url)}, "
        f"device {device}, {len(dataset.labels)} images, {torch.get_num_threads()} thread(s)")
    stop = threading.Event()
    if install_signal_handlers:
        _install_stop_handlers(stop, log)

    def objective(on_started: Callable[[optuna.Trial], None]) -> Objective:
        return Objective(config, dataset, device=device, stop_event=stop, on_started=on_started)

    return trial_loop(study, url, objective, stop=stop, max_trials=max_trials,
                      max_retries=config.workers.max_retries,
                      poll=min(2.0, config.workers.heartbeat_interval), log=log)


ObjectiveFactory = Callable[[Callable[[optuna.Trial], None]], Callable[[optuna.Trial], float]]


def trial_loop(
    study: optuna.Study,
    url: str,
    make_objective: ObjectiveFactory,
    *,
    stop: threading.Event,
    max_trials: int | None = None,
    max_retries: int = 2,
    poll: float = 2.0,
    log: Callable[[str], None] = print,
) -> WorkerResult:
    """Run trials until the budget is met, ``max_trials`` ran, or ``stop`` is set.

    ``make_objective(on_started)`` returns the objective; it must call ``on_started(trial)``
    first thing, which releases the study lock.
    """
    retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)
    gate = _BudgetGate(study, url)
    result = WorkerResult()
    failures = storage_errors = 0
    while not stop.is_set():
        if max_trials is not None and result.trials_run >= max_trials:
            break
        try:
            step, failed_trial_id = gate.next_trial(make_objective)
            storage_errors = 0
        except STORAGE_ERRORS as exc:
            # The network blinked or the server restarted: pool_pre_ping replaces dead
            # connections, so waiting and trying again is enough.
            storage_errors += 1
            if storage_errors > MAX_STORAGE_ERRORS:
                raise
            delay = min(2.0**storage_errors, 30.0)
            log(f"storage error ({mask_text(str(exc).splitlines()[0], url)}); retrying in {delay:.0f}s")
            stop.wait(delay)
            continue
        if step == "done":
            result.budget_met = True
            break
        if step == "wait":
            stop.wait(poll)
            continue
        result.trials_run += 1
        if failed_trial_id is None:
            failures = 0
            continue
        last = study._storage.get_trial(failed_trial_id)
        if stop.is_set():
            retry(study, last)  # interrupted, not broken: run it again elsewhere, same params
            break
        failures += 1
        log(f"trial {last.number} failed: {last.user_attrs.get('fail_reason', 'see the worker log')}")
        if failures >= MAX_CONSECUTIVE_FAILURES:
            log(f"giving up after {failures} failed trials in a row; the last: "
                f"{last.user_attrs.get('fail_reason', 'see above')}")
            result.gave_up = True
            break
    result.stopped_by_signal = stop.is_set()
    return result


class _BudgetGate:
    """Decides, under the study lock, whether this worker may start a trial.

    The budget (a study attribute) is re-read only when it could change the decision or
    every BUDGET_REFRESH_SECONDS; each trial otherwise costs the lock and one count query.
    """

    BUDGET_REFRESH_SECONDS = 30.0

    def __init__(self, study: optuna.Study, url: str) -> None:
        self.study = study
        self.url = url
        self._budget: int | None = None
        self._budget_read_at = 0.0
        self._connection = None  # the study lock's connection while it is held (PostgreSQL)

    def _read_budget(self, force: bool) -> int:
        if force or self._budget is None or time.monotonic() - self._budget_read_at > self.BUDGET_REFRESH_SECONDS:
            self._budget = study_budget(self.study)
            self._budget_read_at = time.monotonic()
        return self._budget

    def _counts(self) -> dict[TrialState, int]:
        return count_trial_states(self.study._storage, self.study._study_id, self._connection)

    def next_trial(self, make_objective: ObjectiveFactory) -> tuple[str, int | None]:
        """("done" | "wait" | "ran", id of our trial if it FAILed)."""
        lock = contextlib.ExitStack()
        self._connection = lock.enter_context(study_lock(self.url, self.study.study_name))
        try:
            counts = self._counts()
            if finished(counts) + counts[TrialState.RUNNING] >= self._read_budget(force=False):
                # Before stopping or waiting: fail the trials of dead workers (heartbeats only
                # do so inside optimize) so their retries get a slot, and confirm the budget.
                fail_stale_trials(self.study)
                counts = self._counts()
                budget = self._read_budget(force=True)
                if finished(counts) >= budget:
                    return "done", None
                if finished(counts) + counts[TrialState.RUNNING] >= budget:
                    return "wait", None  # a running trial may still fail and need a retry
            outcome: dict[str, int | bool] = {}

            def on_started(trial: optuna.Trial) -> None:
                outcome["trial_id"] = trial._trial_id
                lock.close()  # the trial now counts as RUNNING: the next worker may decide

            objective = make_objective(on_started)

            def tracked(trial: optuna.Trial) -> float:
                try:
                    return objective(trial)
                except optuna.TrialPruned:
                    raise
                except Exception:
                    outcome["failed"] = True
                    raise

            # Every trial error becomes a FAIL with its reason; the worker goes on.
            self.study.optimize(tracked, n_trials=1, catch=(Exception,), gc_after_trial=False)
            failed = outcome.get("failed") and outcome.get("trial_id") is not None
            return "ran", int(outcome["trial_id"]) if failed else None
        finally:
            lock.close()


def _install_stop_handlers(stop: threading.Event, log: Callable[[str], None]) -> None:
    def handle(signum: int, _frame: object) -> None:
        if stop.is_set():
            os._exit(128 + signum)  # second signal: leave now; the heartbeat fails the trial later
        stop.set()
        log(f"{signal.Signals(signum).name}: finishing the current epoch, then stopping (again to quit now)")

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


# ---------------------------------------------------------------- launcher


@dataclass
class Slot:
    rank: int
    device: str
    env: dict[str, str]
    threads: int
    process: subprocess.Popen | None = None
    restarts: int = 0
    state: str = "starting"
    exit_codes: list[int] = field(default_factory=list)


def plan_slots(gpus: Sequence[int] | None, workers_per_gpu: int, workers: int | None) -> list[Slot]:
    """One slot per GPU x workers_per_gpu (pinned by CUDA_VISIBLE_DEVICES), else CPU workers."""
    if gpus:
        slots = []
        for gpu in gpus:
            for _ in range(workers_per_gpu):
                slots.append(Slot(len(slots), "cuda:0", {"CUDA_VISIBLE_DEVICES": str(gpu)}, threads=2))
        return slots
    count = workers or 2
    threads = max(1, (os.cpu_count() or 1) // count)  # N workers on N cores must not oversubscribe them
    return [Slot(rank, "cpu", {"CUDA_VISIBLE_DEVICES": ""}, threads) for rank in range(count)]


def detect_gpus() -> list[int]:
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001 - no usable CUDA: CPU workers
        return []


def launch(
    study_name: str,
    url: str,
    *,
    slots: list[Slot],
    overrides: Sequence[str] = (),
    log_dir: Path,
    max_restarts: int = 3,
    view: Callable[[optuna.Study, list[Slot]], None] | None = None,
    refresh_seconds: float = 1.0,
) -> int:
    """Start one worker process per slot and supervise them until the study's budget is met.

    Returns 0 when the budget was reached, 1 otherwise. A crashed worker is restarted
    (at most ``max_restarts`` times per slot); a worker that exits 2 (bad input) is not.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    study = load_study(study_name, url)
    interrupted = {"count": 0}

    def forward(signum: int, _frame: object) -> None:
        interrupted["count"] += 1
        for slot in slots:
            if slot.process and slot.process.poll() is None:
                slot.process.send_signal(signal.SIGTERM if interrupted["count"] == 1 else signal.SIGKILL)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for slot in slots:
            _start(slot, study_name, url, overrides, log_dir)
        while True:
            alive = 0
            for slot in slots:
                code = slot.process.poll() if slot.process else None
                if slot.process is not None and code is None:
                    alive += 1
                    continue
                if slot.process is None:
                    continue
                slot.exit_codes.append(code)
                slot.process = None
                budget_met = finished(count_trial_states(study._storage, study._study_id)) >= study_budget(study)
                if code in (0, EXIT_BAD_INPUT, EXIT_GAVE_UP) or budget_met or interrupted["count"]:
                    slot.state = f"exited {code}"
                    if code in (EXIT_BAD_INPUT, EXIT_GAVE_UP):  # say why without opening the log
                        slot.state += f": {_last_line(log_dir / f'worker-{slot.rank}.log')}"
                elif slot.restarts < max_restarts:
                    slot.restarts += 1
                    _start(slot, study_name, url, overrides, log_dir)
                    slot.state = f"restarted ({slot.restarts}) after exit {code}"
                    alive += 1
                else:
                    slot.state = f"crashed (exit {code}), restart limit reached"
            if view:
                view(study, slots)
            if alive == 0:
                break
            time.sleep(refresh_seconds)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0 if finished(count_trial_states(study._storage, study._study_id)) >= study_budget(study) else 1


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:200] if lines else ""


def _start(slot: Slot, study_name: str, url: str, overrides: Sequence[str], log_dir: Path) -> None:
    env = {**os.environ, **slot.env, ENV_VAR: url,  # the URL travels in the environment, not in `ps`
           "OMP_NUM_THREADS": str(slot.threads), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "alpa_tune", "worker", study_name, "--rank", str(slot.rank),
               "--device", slot.device, "--threads", str(slot.threads)]
    for item in overrides:
        command += ["--set", item]
    log = open(log_dir / f"worker-{slot.rank}.log", "ab")
    slot.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    slot.state = "running"
