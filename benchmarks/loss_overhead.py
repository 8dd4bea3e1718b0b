"""Forward+backward cost of the fused ALPA loss against BCE and the authors' unfused sequence.

    python benchmarks/loss_overhead.py [--rounds 200] [--reps 5] [--shapes 128x5,256x52,4096x17]

For each shape (CPU float32, and CUDA bfloat16 when a GPU is present) it times, on the same
logits and in interleaved rounds (so background load hits every contender alike):

* ``bce``: ``torch.nn.BCEWithLogitsLoss(reduction="sum")`` on a float one-hot target;
* ``alpa``: the fused ALPA loss on int64 class indices (the training path);
* ``alpa 1-hot``: the same on the float one-hot target;
* ``alpa, new params every call``: ``set_params`` with fresh values before every call;
* ``unfused``: the authors' sequence (sigmoid, clamp, Padé terms, focusing factors, eq. 11's
  weight as a separate power) under autograd.

Every round is a new trial: hyperparameters are drawn afresh from the search space (alpha,
beta in [0.5, 2], gammas in [0, 5]) and set before the round. Each figure is the best round's
mean per call (the round least disturbed by other processes; on a shared machine medians
mostly measure the neighbours); ratios divide those figures. "first call after a switch" is
the median time of ``set_params`` with unseen values plus the next forward+backward, next to
the median of the call after it: equal figures mean no compilation or caching on a switch.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from alpa_tune.losses import alpa_unfused, build_loss, compile_enabled  # noqa: E402

SPACE = {"alpha": (0.5, 2.0), "beta": (0.5, 2.0), "gamma_pos": (0.0, 5.0), "gamma_neg": (0.0, 5.0)}


def draw(rng: random.Random) -> dict[str, float]:
    return {k: rng.uniform(lo, hi) for k, (lo, hi) in SPACE.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_shape(n: int, c: int, device: torch.device, dtype: torch.dtype, rounds: int,
                reps: int, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(n, c, generator=gen)).to(device=device, dtype=dtype).requires_grad_()
    index = torch.randint(0, c, (n,), generator=gen).to(device)
    onehot = F.one_hot(index, c).to(dtype)
    rng = random.Random(seed)
    bce = torch.nn.BCEWithLogitsLoss(reduction="sum")
    alpa = build_loss("alpa", **draw(rng))
    per_call = [draw(rng) for _ in range(reps)]
    trial: dict[str, float] = {}

    def step(loss_of: Callable[[], torch.Tensor]) -> None:
        x.grad = None
        loss_of().backward()

    def run_bce(i: int) -> None:
        step(lambda: bce(x, onehot))

    def run_alpa(i: int) -> None:
        step(lambda: alpa(x, index))

    def run_alpa_onehot(i: int) -> None:
        step(lambda: alpa(x, onehot))

    def run_alpa_switching(i: int) -> None:
        alpa.set_params(**per_call[i])
        step(lambda: alpa(x, index))

    def run_unfused(i: int) -> None:
        step(lambda: alpa_unfused(x, onehot, clip=0.05, **trial))

    contenders = {"bce": run_bce, "alpa": run_alpa, "alpa 1-hot": run_alpa_onehot,
                  "alpa switching": run_alpa_switching, "unfused": run_unfused}
    trial.update(draw(rng))
    for fn in contenders.values():  # warm-up (and any compilation) outside the timing
        alpa.set_params(**trial)
        for i in range(min(reps, 5)):
            fn(i)
    sync(device)

    per_round: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        trial.update(draw(rng))  # each round is a new trial
        for name, fn in contenders.items():
            alpa.set_params(**trial)
            sync(device)
            t0 = time.perf_counter()
            for i in range(reps):
                fn(i)
            sync(device)
            per_round[name].append((time.perf_counter() - t0) / reps)

    # The first call after switching to unseen hyperparameters (set_params included), against
    # the call right after it.
    first, steady = [], []
    for _ in range(rounds):
        hp = draw(rng)
        sync(device)
        t0 = time.perf_counter()
        alpa.set_params(**hp)
        step(lambda: alpa(x, index))
        sync(device)
        first.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        step(lambda: alpa(x, index))
        sync(device)
        steady.append(time.perf_counter() - t0)

    best = {k: min(v) * 1e6 for k, v in per_round.items()}
    return {
        **best,
        "alpa / bce": best["alpa"] / best["bce"],
        "switching / bce": best["alpa switching"] / best["bce"],
        "1-hot / bce": best["alpa 1-hot"] / best["bce"],
        "unfused / alpa": best["unfused"] / best["alpa"],
        "first": statistics.median(first) * 1e6, "steady": statistics.median(steady) * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--shapes", default="128x5,256x52,4096x17")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cuda", action="store_true")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads for the run (default: torch's own default)")
    parser.add_argument("--compile", action="store_true",
                        help="also time ALPA through torch.compile on CPU (ALPA_TUNE_COMPILE=1)")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)

    targets: list[tuple[torch.device, torch.dtype, bool]] = [
        (torch.device("cpu"), torch.float32, False)]
    if args.compile:
        targets.append((torch.device("cpu"), torch.float32, True))
    if torch.cuda.is_available() and not args.no_cuda:
        targets.append((torch.device("cuda"), torch.bfloat16, False))

    print(f"torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}")
    for device, _, forced in targets:
        on = forced or compile_enabled(device)
        print(f"  {device.type}{' (compiled)' if forced else ''}: torch.compile for the ALPA "
              f"kernel {'on' if on else 'off (eager fused)'}")
    print(f"  {args.rounds} interleaved rounds x {args.reps} forward+backward calls each; every "
          "round is a new trial (hyperparameters drawn from the search space)")
    print()
    print("| device | dtype | shape | BCE (us) | ALPA (us) | ALPA / BCE | new params every call "
          "/ BCE | ALPA 1-hot / BCE | unfused (us) | unfused / ALPA | first call after a switch "
          "(us) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for device, dtype, forced in targets:
        if forced:
            os.environ["ALPA_TUNE_COMPILE"] = "1"
            t0 = time.perf_counter()
            bench_shape(8, 3, device, dtype, 1, 1, args.seed)  # compile outside the timing
            print(f"  (CPU compilation took {time.perf_counter() - t0:.1f} s)", flush=True)
        for n, c in shapes:
            r = bench_shape(n, c, device, dtype, args.rounds, args.reps, args.seed)
            label = f"{device.type}{' compiled' if forced else ''}"
            print(f"| {label} | {str(dtype).removeprefix('torch.')} | ({n}, {c}) "
                  f"| {r['bce']:.0f} | {r['alpa']:.0f} | **{r['alpa / bce']:.2f}x** "
                  f"| {r['switching / bce']:.2f}x | {r['1-hot / bce']:.2f}x "
                  f"| {r['unfused']:.0f} | **{r['unfused / alpa']:.1f}x** "
                  f"| {r['first']:.0f} (next call {r['steady']:.0f}) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
