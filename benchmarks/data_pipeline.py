"""Images/s delivered to the model: the decode-once cached pipeline vs torchvision ImageFolder.

Both read the same generated class-folder tree of PNGs and deliver augmented, normalised
float batches at the same size, in one run:

* cached: ``load_dataset`` (folder source) decodes once into the memory-mapped cache; each
  batch is a slice of that array plus ``alpa_tune.augment.train_transform`` (flip, rotation,
  sharpness, erasing, ImageNet normalisation), in the training process;
* baseline: ``torchvision.datasets.ImageFolder`` + PIL transforms (the same recipe) +
  ``DataLoader`` with 2 worker processes, decoding every PNG every epoch.

Then two processes read the one cache at once, and each reports its peak resident memory and
how much of it is private (anonymous) vs shared page cache (file-backed).

    python benchmarks/data_pipeline.py [--images 6000] [--size 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alpa_tune.augment import IMAGENET_MEAN, IMAGENET_STD, reuse_cpu_memory, train_transform  # noqa: E402
from alpa_tune.config import DataConfig  # noqa: E402
from alpa_tune.data import load_dataset  # noqa: E402


def write_pngs(root: Path, count: int, size: int, classes: int = 5) -> None:
    """A long-tailed class-folder tree of smooth, noisy RGB PNGs (PNG-compressible like photos)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    weights = 10.0 ** (-np.arange(classes) / (classes - 1))  # imbalance ratio 10
    per_class = np.maximum(1, np.round(count * weights / weights.sum())).astype(int)
    for c, n in enumerate(per_class):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)
            noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 12, (size, size, 3))
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{c}_{i:05d}.png")


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[np.ndarray]:
    order = torch.randperm(n, generator=generator).numpy()
    # Sorted within a batch: the memmap is read front to back; order inside a batch is irrelevant.
    return [np.sort(order[i : i + batch_size]) for i in range(0, n, batch_size)]


def cached_epoch(images: np.ndarray, batch_size: int, gen: torch.Generator, loader_threads: int) -> float:
    """One epoch of the cached pipeline; returns images/s.

    ``loader_threads`` threads each slice and augment whole batches (torch releases the GIL),
    a bounded read-ahead like the DataLoader's workers: coarse-grained parallelism that, unlike
    intra-op threads, does not stall when another process takes a core.
    """
    order = batches(len(images), batch_size, gen)
    gens = [torch.Generator().manual_seed(int(torch.randint(1 << 30, (1,), generator=gen))) for _ in range(loader_threads)]

    def load(k: int) -> torch.Tensor:
        # Batch k + loader_threads is submitted only after batch k is consumed: one generator per slot is safe.
        return train_transform(torch.from_numpy(images[order[k]]), gens[k % loader_threads])

    delivered, start = 0, time.perf_counter()
    with ThreadPoolExecutor(max_workers=loader_threads) as pool:
        pending: deque[Future[torch.Tensor]] = deque()
        for k in range(len(order)):
            pending.append(pool.submit(load, k))
            if len(pending) >= loader_threads:
                delivered += pending.popleft().result().shape[0]
        while pending:
            delivered += pending.popleft().result().shape[0]
    return delivered / (time.perf_counter() - start)


def imagefolder_loader(root: Path, size: int, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    transform = T.Compose([
        T.Resize((size, size)),  # a no-op when the files already have the size; kept for fairness
        T.RandomHorizontalFlip(),
        T.RandomRotation(15),
        T.RandomAdjustSharpness(2),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        T.RandomErasing(),
    ])
    return torch.utils.data.DataLoader(
        ImageFolder(str(root), transform=transform), batch_size=batch_size, shuffle=True,
        num_workers=workers, persistent_workers=workers > 0,
    )


def loader_epoch(loader: torch.utils.data.DataLoader) -> float:
    delivered, start = 0, time.perf_counter()
    for images, _labels in loader:
        delivered += images.shape[0]
    return delivered / (time.perf_counter() - start)


def compare(images: np.ndarray, loader: torch.utils.data.DataLoader, batch_size: int, rounds: int,
            loader_threads: int) -> tuple[float, float]:
    """Median images/s of each pipeline over alternating epochs.

    Alternating puts both under the same background load (a shared machine drifts); the
    untimed first round warms the page cache, the allocator and the loader's workers.
    """
    gen = torch.Generator().manual_seed(0)
    cached_epoch(images, batch_size, gen, loader_threads)
    loader_epoch(loader)
    cached, baseline = [], []
    for _ in range(rounds):
        cached.append(cached_epoch(images, batch_size, gen, loader_threads))
        baseline.append(loader_epoch(loader))
    return float(np.median(cached)), float(np.median(baseline))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _mapping_kib(path: str) -> dict[str, int]:
    """Rss / Pss / Shared_Clean / Private_* of this process's mapping(s) of ``path`` (KiB)."""
    totals: dict[str, int] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping header line
            inside = line.endswith(path)
        elif inside and head and head[0].rstrip(":") in ("Rss", "Pss", "Shared_Clean", "Private_Clean", "Private_Dirty"):
            totals[head[0].rstrip(":")] = totals.get(head[0].rstrip(":"), 0) + int(head[1])
    return totals


def _reader(cfg: DataConfig, batch_size: int, barrier: mp.Barrier, queue: mp.Queue) -> None:
    """One worker: open the cache, read every batch through the transform, report memory (KiB)."""
    torch.set_num_threads(1)
    anon_before = _status_kib("RssAnon")
    data = load_dataset(cfg)
    gen = torch.Generator().manual_seed(1)
    for idx in batches(len(data.images), batch_size, gen):
        train_transform(torch.from_numpy(data.images[idx]), gen)
    barrier.wait()  # both workers hold the whole cache mapped now
    queue.put({
        "is_memmap": isinstance(data.images, np.memmap),
        "peak_rss": _status_kib("VmHWM"),
        "anon_growth": _status_kib("RssAnon") - anon_before,
        "cache": _mapping_kib(str(Path(data.images.filename).resolve())),
    })
    barrier.wait()  # keep the mapping alive until the other worker has measured too


def measure_workers(cfg: DataConfig, batch_size: int, count: int = 2) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(count)
    procs = [ctx.Process(target=_reader, args=(cfg, batch_size, barrier, queue)) for _ in range(count)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    return results


def checksum_cost(path: Path, repeats: int = 5) -> tuple[float, int, int]:
    """(best seconds, bytes, threads) of the CRC-32 pass that verifies a cache entry on a hit."""
    from alpa_tune.data import cache

    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            cache._checksums(handle.fileno(), size, cache.CHECKSUM_CHUNK)
            best = min(best, time.perf_counter() - t0)
    chunks = -(-size // cache.CHECKSUM_CHUNK)
    return best, size, min(8, os.cpu_count() or 1, chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--size", type=int, default=64, help="delivered image size (and PNG size)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per pipeline (alternating)")
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--loader-threads", type=int, default=2, help="threads of the cached pipeline, each doing whole batches")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="skip reuse_cpu_memory() (glibc then returns each freed batch to the OS)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed after")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    # Both pipelines get it: the DataLoader's workers are forked from this process.
    tuned = False if args.default_malloc else reuse_cpu_memory()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="alpa-bench-"))
    try:
        root, cache = workdir / "pngs", workdir / "cache"
        shutil.rmtree(cache, ignore_errors=True)  # measure the decode-once build from scratch
        t0 = time.perf_counter()
        if not root.exists():
            write_pngs(root, args.images, args.size)
        print(f"files:    {args.images} PNGs at {args.size} px in {root} ({time.perf_counter() - t0:.1f} s to write)")
        print(f"machine:  {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
              f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
              f"malloc keeps freed memory: {'yes' if tuned else 'no'}")

        cfg = DataConfig(source="folder", path=str(root), image_size=args.size, cache_dir=str(cache))
        t0 = time.perf_counter()
        data = load_dataset(cfg)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        data = load_dataset(cfg)
        reuse_s = time.perf_counter() - t0
        nbytes = data.images.nbytes
        print(f"cache:    decode once {build_s:.1f} s ({len(data.images) / build_s:,.0f} img/s), "
              f"reuse {reuse_s * 1e3:.0f} ms, {nbytes / 2**20:.0f} MiB memmap")
        verify_s, file_bytes, threads = checksum_cost(Path(data.images.filename))
        rate = file_bytes / verify_s
        print(f"verify:   checksums of the {file_bytes / 1e6:.0f} MB cache file in {verify_s * 1e3:.0f} ms "
              f"({rate / 1e9:.1f} GB/s, {threads} thread(s), from the page cache): {verify_s / build_s:.1%} of the "
              f"decode, {verify_s / reuse_s:.0%} of the reuse; a 30 GB cache would take ~{30e9 / rate:.0f} s "
              f"(or its disk's read time when not in memory)")

        loader = imagefolder_loader(root, args.size, args.batch_size, args.loader_workers)
        cached, baseline = compare(data.images, loader, args.batch_size, args.rounds, args.loader_threads)
        print(f"cached:   {cached:10,.0f} img/s  (memmap slice + train_transform, {args.loader_threads} loader threads "
              f"x {torch.get_num_threads()} torch thread(s), batch {args.batch_size})")
        print(f"baseline: {baseline:10,.0f} img/s  (ImageFolder + PIL transforms, DataLoader {args.loader_workers} workers)")
        ratio = cached / baseline
        print(f"ratio:    {ratio:.1f}x  (target >= 5x) {'OK' if ratio >= 5 else 'BELOW TARGET'}; "
              f"medians of {args.rounds} alternating epochs")
        del loader
        print(f"          (load average now {os.getloadavg()[0]:.1f}: other processes on the machine skew both figures)")

        for i, r in enumerate(measure_workers(cfg, args.batch_size), start=1):
            m = r["cache"]
            print(f"worker {i}: peak RSS {r['peak_rss'] / 1024:.0f} MiB; cache mapping: RSS {m.get('Rss', 0) / 1024:.0f} MiB, "
                  f"shared {m.get('Shared_Clean', 0) / 1024:.0f} MiB, private {(m.get('Private_Clean', 0) + m.get('Private_Dirty', 0)) / 1024:.0f} MiB, "
                  f"PSS {m.get('Pss', 0) / 1024:.0f} MiB; private heap grew {r['anon_growth'] / 1024:.0f} MiB "
                  f"(memmap: {r['is_memmap']})")
        print(f"          the {nbytes / 2**20:.0f} MiB cache is held once in the page cache, mapped by both workers "
              f"and this process (PSS = its RSS shared 3 ways); peak RSS is mostly torch's own libraries")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
