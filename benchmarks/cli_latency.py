"""Read-only commands against Optuna's own CLI on the same storage: wall time and peak memory.

``alpa-tune study list`` against ``optuna studies`` and ``alpa-tune study show`` against
``optuna trials``, on one SQLite file holding a study of N finished trials, run alternately
(so a busy machine slows both alike) and reported as the median ratio. Goal: <= 1.3x wall time
and <= 1.5x peak memory.

    python benchmarks/cli_latency.py [--trials 60] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ("alpha", "beta", "gamma_pos", "gamma_neg")


def make_storage(folder: Path, trials: int) -> tuple[str, str]:
    """A real alpa-tune study with ``trials`` completed trials (values and attributes as a worker writes)."""
    import optuna

    from alpa_tune.config import load_config
    from alpa_tune.study import create_study

    url = f"sqlite:///{folder / 'latency.db'}"
    config = load_config(ROOT / "studies" / "digits-lt.toml", ["search.enqueue_paper_points=false"])
    study = create_study(config, url)
    distributions = {name: optuna.distributions.FloatDistribution(0.0, 5.0) for name in PARAMS}
    distributions["variant"] = optuna.distributions.CategoricalDistribution(["alpa", "alpa_hill"])
    for number in range(trials):
        params = {name: 0.5 + (number * 0.37 + i) % 1.5 for i, name in enumerate(PARAMS)}
        params["variant"] = "alpa" if number % 2 else "alpa_hill"
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=distributions, value=0.5 + (number % 17) / 40,
            intermediate_values={0: 0.5, 1: 0.6, 2: 0.7},
            user_attrs={"fold_balanced_accuracy": [0.5, 0.6, 0.7], "class_names": [str(c) for c in range(10)],
                        "class_recall": [0.7] * 10, "worker": f"host:{1000 + number}", "epoch_seconds": 1.0}))
    return url, study.study_name


def measure(command: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one run of ``command``."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode()[-500:]}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


def compare(ours: list[str], theirs: list[str], repeats: int, cwd: Path) -> tuple[float, float, float, float]:
    """Median wall and peak memory of each, alternating runs (one warm-up run each first)."""
    measure(ours, cwd), measure(theirs, cwd)
    ours_runs, theirs_runs = [], []
    for _ in range(repeats):
        ours_runs.append(measure(ours, cwd))
        theirs_runs.append(measure(theirs, cwd))
    return (statistics.median(w for w, _ in ours_runs), statistics.median(w for w, _ in theirs_runs),
            statistics.median(m for _, m in ours_runs), statistics.median(m for _, m in theirs_runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--make-storage-in", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_storage_in:  # in a child: a fork of a large parent would start at the parent's RSS
        print(*make_storage(args.make_storage_in, args.trials))
        return
    optuna_cli = str(Path(sys.executable).with_name("optuna"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        made = subprocess.run([sys.executable, __file__, "--trials", str(args.trials), "--make-storage-in", tmp],
                              capture_output=True, text=True, check=True)
        url, name = made.stdout.split()
        ours = [sys.executable, "-m", "alpa_tune"]
        pairs = {
            "study list": ([*ours, "study", "list", "--storage", url], [optuna_cli, "studies", "--storage", url]),
            "study show": ([*ours, "study", "show", name, "--storage", url],
                           [optuna_cli, "trials", "--study-name", name, "--storage", url]),
        }
        print(f"{args.trials} finished trials, SQLite, median of {args.repeats} alternating runs")
        print(f"{'command':<12} {'alpa-tune s':>12} {'optuna s':>9} {'wall ratio':>10} "
              f"{'alpa-tune MiB':>14} {'optuna MiB':>11} {'memory ratio':>12}")
        for label, (mine, reference) in pairs.items():
            wall, ref_wall, memory, ref_memory = compare(mine, reference, args.repeats, folder)
            print(f"{label:<12} {wall:>12.2f} {ref_wall:>9.2f} {wall / ref_wall:>9.2f}x "
                  f"{memory:>14.0f} {ref_memory:>11.0f} {memory / ref_memory:>11.2f}x")


if __name__ == "__main__":
    main()
