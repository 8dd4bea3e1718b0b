"""Start and supervise N worker processes on this machine: GPU pinning, restarts, a live view.

The launcher only reads the study (progress for its view, whether the budget is met); a storage
outage makes it show "storage unreachable" and keep supervising, never exit. Workers take
their ranks (sampler seeds) from the study itself, so two launchers on one study never share one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from alpa_tune.errors import EXIT_BAD_INPUT, EXIT_DISK_FULL, EXIT_GAVE_UP, EXIT_STORAGE_LOST
from alpa_tune.storage import ENV_VAR
from alpa_tune.study import budget_met, load_study

# A worker that exits with one of these would fail the same way again: not restarted.
_FINAL_EXITS = (0, EXIT_BAD_INPUT, EXIT_GAVE_UP, EXIT_STORAGE_LOST, EXIT_DISK_FULL)


@dataclass
class Slot:
    index: int
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
    return [Slot(index, "cpu", {"CUDA_VISIBLE_DEVICES": ""}, threads) for index in range(count)]


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
    (at most ``max_restarts`` times per slot); one that exits for a reason a restart cannot
    mend (bad input, repeated failures, storage gone or its disk full) is not.
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
                if code in _FINAL_EXITS or interrupted["count"] or budget_met(study):
                    slot.state = f"exited {code}"
                    if code != 0:  # say why without opening the log
                        slot.state += f": {_last_line(log_dir / f'worker-{slot.index}.log')}"
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
    return 0 if budget_met(study) else 1


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:200] if lines else ""


def _start(slot: Slot, study_name: str, url: str, overrides: Sequence[str], log_dir: Path) -> None:
    env = {**os.environ, **slot.env, ENV_VAR: url,  # the URL travels in the environment, not in `ps`
           "OMP_NUM_THREADS": str(slot.threads), "PYTHONUNBUFFERED": "1"}
    env.pop("ALPA_TUNE_RANK", None)  # each worker takes a free rank from the study
    command = [sys.executable, "-m", "alpa_tune", "worker", study_name,
               "--device", slot.device, "--threads", str(slot.threads)]
    for item in overrides:
        command += ["--set", item]
    log = open(log_dir / f"worker-{slot.index}.log", "ab")
    slot.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    slot.state = "running"
