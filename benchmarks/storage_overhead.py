"""Per-trial cost of the alpa-tune worker loop against a bare ``study.optimize``, same PostgreSQL.

Both run a trivial objective (the search space's five suggestions, no training), so what is
left is storage and bookkeeping: the loop's lock, stale-trial check, budget count, its own heartbeat and its exactly-once record. Then
trials per second with 1, 2, 4 and 8 worker processes sharing one study.

    python benchmarks/storage_overhead.py [--trials 200] [--admin-url postgresql://postgres@127.0.0.1/postgres]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import threading
import time
import uuid

import optuna
import sqlalchemy

from alpa_tune.config import WorkersConfig
from alpa_tune.storage import driver_url, open_storage, quiet_optuna
from alpa_tune.study import BUDGET_ATTR
from alpa_tune.workers import trial_loop

WORKERS = WorkersConfig(heartbeat_interval=10, grace_period=30, max_retries=2)


def trivial(trial: optuna.Trial) -> float:
    values = [trial.suggest_float(name, 0.5, 2.0) for name in ("alpha", "beta", "gamma_pos", "gamma_neg")]
    trial.suggest_categorical("variant", ["alpa", "alpa_hill"])
    return sum(values)


def new_study(url: str, name: str, budget: int) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=open_storage(url, WORKERS), direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_user_attr(BUDGET_ATTR, budget)
    return study


def time_bare(url: str, trials: int) -> float:
    study = new_study(url, f"bare-{uuid.uuid4().hex[:6]}", trials)
    started = time.perf_counter()
    study.optimize(trivial, n_trials=trials, gc_after_trial=False)
    return (time.perf_counter() - started) / trials


def time_loop(url: str, trials: int) -> float:
    study = new_study(url, f"loop-{uuid.uuid4().hex[:6]}", trials)
    started = time.perf_counter()
    result = trial_loop(study, url, trivial, stop=threading.Event(), log=lambda _: None)
    assert result.trials_run == trials and result.budget_met
    return (time.perf_counter() - started) / trials


def _worker(url: str, name: str, rank: int) -> None:
    quiet_optuna()  # a spawned process starts with Optuna's warnings on again
    study = optuna.load_study(study_name=name, storage=open_storage(url, WORKERS),
                              sampler=optuna.samplers.RandomSampler(seed=rank))
    trial_loop(study, url, trivial, stop=threading.Event(), poll=0.05, log=lambda _: None)


def throughput(url: str, workers: int, trials: int) -> float:
    name = f"tp{workers}-{uuid.uuid4().hex[:6]}"
    new_study(url, name, trials)
    # spawn, not fork: a forked child would share the parent's open database connections.
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker, args=(url, name, r)) for r in range(workers)]
    started = time.perf_counter()
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    elapsed = time.perf_counter() - started
    complete = optuna.load_study(study_name=name, storage=driver_url(url)).get_trials(
        states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == trials, f"{len(complete)} != {trials}: the budget must be exact"
    return trials / elapsed


def main() -> None:
    quiet_optuna()  # as the CLI does: Optuna's per-trial info lines would drown the table
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()

    database = f"alpa_bench_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(driver_url(args.admin_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{database}"'))
    url = args.admin_url.rsplit("/", 1)[0] + f"/{database}"
    try:
        bare, loop = [], []
        for _ in range(args.repeats):  # interleaved so drift hits both alike
            bare.append(time_bare(url, args.trials))
            loop.append(time_loop(url, args.trials))
        b, l = statistics.median(bare), statistics.median(loop)
        print(f"per-trial time, {args.trials} trials x {args.repeats} runs (median), trivial objective, PostgreSQL")
        print(f"  bare study.optimize      {b * 1000:7.2f} ms")
        print(f"  alpa-tune worker loop    {l * 1000:7.2f} ms")
        print(f"  ratio loop / bare        {l / b:7.2f}x   (target <= 1.15x)")
        print("throughput, one study shared by N worker processes (exact budget checked)")
        for workers in (1, 2, 4, 8):
            rate = throughput(url, workers, args.trials)
            print(f"  {workers} worker(s): {rate:7.1f} trials/s")
    finally:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid()"),
                {"db": database})
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{database}"'))
        admin.dispose()


if __name__ == "__main__":
    main()
