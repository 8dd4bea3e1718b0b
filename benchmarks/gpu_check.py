"""Everything GPU-related, in one command and one table, in under 8 minutes on one GPU.

    python benchmarks/gpu_check.py [--json OUT] [--budget 470]
    python benchmarks/gpu_check.py --cpu-smoke [--json OUT]   # tiny sizes on CPU (tests/test_gpu_check.py)

Checks, each in its own process under a time limit, so that a crash, a hang or an out-of-memory
is that row's error and the rest still run; no check starts once --budget seconds are spent:

* device: name, memory, the bf16 dense peak from the vendor's datasheet (known names) and the
  one a large bf16 matmul reaches here;
* input: BatchReader's batches (pinned memory, side stream) equal direct indexing of the
  memmap; augment's channels_last output equals its NCHW one; host syncs in a training epoch
  (CUDA's sync debug mode); a NaN loss stops training with the step it appeared at; one fold
  of a tiny study trains and scores on the device;
* training: convnext_base, 256 px, batch 128, ALPA loss, full steps (augmentation on the
  device, Adam): images/s for fp32 / bf16 / bf16 + channels_last / + torch.compile, fed by the
  real input path (memmap -> BatchReader) and by one batch already on the device; their ratio
  says whether input is the bottleneck (goal >= 0.95); achieved model TFLOP/s (FLOPs counted
  by torch's FlopCounterMode) against the bf16 peak;
* ALPA: bf16 (and the fp32 training path) against float64, max error of loss and gradient;
  forward+backward time against BCEWithLogits (benchmarks/loss_overhead.py's timing);
* study: `alpa-tune launch --gpus 0 --workers-per-gpu 2` on a tiny study, embedded SQLite in a
  temporary folder, run to its budget;
* compare: `alpa-tune compare` (one training process per GPU) on the same tiny study.

--cpu-smoke runs the same checks on CPU at tiny sizes (resnet10t at 32 px, a few steps, a
2-trial study; the compile and bf16-only rows and the matmul peak skipped) so this script never
rots unnoticed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s (first matching name wins).
BF16_PEAK_TFLOPS = [("H200", 989), ("GH200", 989), ("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989),
                    ("H800", 989), ("B200", 2250), ("A100", 312), ("A800", 312), ("L40S", 362), ("L40", 181),
                    ("L4", 121), ("A10G", 70), ("A10", 125), ("RTX 4090", 165), ("RTX 3090", 71)]
SETTINGS = {  # each adds to the previous one
    "fp32": {"amp": "off", "channels_last": False, "compile": False},
    "bf16": {"amp": "bf16", "channels_last": False, "compile": False},
    "bf16+channels_last": {"amp": "bf16", "channels_last": True, "compile": False},
    "bf16+channels_last+compile": {"amp": "bf16", "channels_last": True, "compile": True},
}
FULL = {"model": "convnext_base", "size": 256, "batch": 128, "images": 3072, "warmup": 6, "rounds": 2,
        "tiny_size": 32, "tiny_per_class": 120, "trials": 4, "epochs": 2}
SMOKE = {"model": "resnet10t", "size": 32, "batch": 16, "images": 64, "warmup": 1, "rounds": 1,
         "tiny_size": 16, "tiny_per_class": 24, "trials": 2, "epochs": 1}
CLASSES = 17  # BoneMarrow's
PAPER_ALPA = {"alpha": 0.875, "beta": 1.625, "gamma_pos": 0.0, "gamma_neg": 4.0, "clip": 0.05}
# (name, limit in seconds on a GPU); run in this order, shown in the order of ROWS below.
SECTIONS = [("device", 60), ("input", 120), ("train:fp32", 120), ("train:bf16", 90),
            ("train:bf16+channels_last", 90), ("alpa", 180), ("study", 180), ("compare", 150),
            ("train:bf16+channels_last+compile", 300)]
SMOKE_SKIPS = {"train:bf16": "the same code as the next row", "train:bf16+channels_last+compile":
               "a CPU compile takes minutes"}
TINY_STUDY = """name = "gpu-check"

[data]
source = "synthetic"
image_size = {size}
num_classes = 4
samples_per_class = {per_class}
imbalance_ratio = 4.0

[model]
backbone = "resnet10t"

[training]
folds = 2
epochs = {epochs}
batch_size = 32
lr = 0.003
{threads}

[search]
n_trials = {trials}
pruner = "none"
seed = 0

"""


# -- the parent: runs each section in a child process, prints one table --------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (what CI runs)")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for the whole run (default 470)")
    parser.add_argument("--only", action="append", help="run just these sections (repeatable)")
    parser.add_argument("--workdir", type=Path, help="keep the inputs, the study and its logs here "
                        "(default: a temporary folder, removed after)")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # a child: run one section
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.section:
        return run_child(args)

    started = time.monotonic()
    deadline = started + args.budget
    sizes = SMOKE if args.cpu_smoke else FULL
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="alpa-gpu-check-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        write_inputs(workdir, sizes, args.cpu_smoke)
        for name, limit in SECTIONS:
            if args.only and name not in args.only:
                continue
            if args.cpu_smoke and name in SMOKE_SKIPS:
                results[name] = {"status": "skipped", "error": f"skipped in --cpu-smoke ({SMOKE_SKIPS[name]})"}
                continue
            if name != "device" and results.get("device", {}).get("data", {}).get("cuda") is False and not args.cpu_smoke:
                results[name] = {"status": "skipped", "error": "no CUDA GPU"}
                continue
            left = deadline - time.monotonic()
            if left < 10:
                results[name] = {"status": "skipped", "error": f"not started: the {args.budget:.0f} s budget is spent"}
                continue
            results[name] = run_section(name, workdir, min(limit, left), args.cpu_smoke)
            print(f"  {name}: {results[name]['status']} in {results[name].get('seconds', 0):.0f} s", file=sys.stderr,
                  flush=True)
    total = time.monotonic() - started
    rows = table_rows(results, sizes)
    print_table(rows, results, total, args.budget, args.cpu_smoke)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu_smoke": args.cpu_smoke, "seconds": round(total, 1),
                                         "budget": args.budget, "sections": results, "rows": rows}, indent=2))
    if not args.cpu_smoke and results.get("device", {}).get("data", {}).get("cuda") is False:
        print("gpu_check: no CUDA GPU is visible; run it on a GPU machine, or with --cpu-smoke", file=sys.stderr)
        return 1
    return 0 if all(r["status"] in ("ok", "skipped") for r in results.values()) else 1


def write_inputs(workdir: Path, sizes: dict[str, Any], smoke: bool) -> None:
    """The cache-like memmap the training checks read, and the tiny study's config."""
    n, size = sizes["images"], sizes["size"]
    images = np.lib.format.open_memmap(workdir / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (min(n, 256), size, size, 3), dtype=np.uint8)
    for start in range(0, n, len(block)):  # a repeated random block: realistic bytes, quick to write
        images[start : start + len(block)] = block[: n - start]
    images.flush()
    del images
    np.save(workdir / "labels.npy", np.arange(n, dtype=np.int64) % CLASSES)
    (workdir / "study.toml").write_text(TINY_STUDY.format(
        size=sizes["tiny_size"], per_class=sizes["tiny_per_class"], epochs=sizes["epochs"], trials=sizes["trials"],
        threads="threads = 1" if smoke else ""))


def child_env(smoke: bool) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])  # alpa_tune, installed or not
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run is a CPU run wherever it runs
        # One thread per process: a CI machine's cores are shared, and 2-thread OpenMP regions
        # crawl when the other thread's core is busy.
        env["OMP_NUM_THREADS"] = "1"
    return env


def run_section(name: str, workdir: Path, limit: float, smoke: bool) -> dict[str, Any]:
    """One section in a child process (its own session: a timeout kills its workers too)."""
    result_path = workdir / f"result-{name.replace(':', '-').replace('+', '-')}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--workdir", str(workdir),
               "--result", str(result_path)] + (["--cpu-smoke"] if smoke else [])
    started = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=child_env(smoke), start_new_session=True)
    try:
        output, _ = child.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        output = stop(child, group=True)
        return {"status": "error", "seconds": round(time.monotonic() - started, 1),
                "error": f"timed out after {limit:.0f} s", "log": output[-4000:]}
    seconds = round(time.monotonic() - started, 1)
    if result_path.exists():
        return {**json.loads(result_path.read_text()), "seconds": seconds}
    last = [line for line in output.strip().splitlines() if line.strip()][-1:] or [f"exit code {child.returncode}"]
    return {"status": "error", "seconds": seconds, "error": f"crashed: {last[0][:300]}", "log": output[-4000:]}


def stop(process: subprocess.Popen, *, group: bool, grace: float = 30.0) -> str:
    """SIGTERM (an alpa-tune launcher passes it on to its workers, which leave cleanly), then SIGKILL."""
    send = (lambda sig: os.killpg(process.pid, sig)) if group else process.send_signal
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            send(sig)
            return process.communicate(timeout=wait)[0] or ""
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            break
    return process.communicate()[0] or ""


# -- the table -------------------------------------------------------------------------------------
def table_rows(results: dict[str, dict[str, Any]], sizes: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    device = results.get("device", {}).get("data", {})
    peak = device.get("spec_bf16_tflops") or device.get("matmul_tflops")
    for name, _ in sorted(SECTIONS, key=lambda s: ROWS.index(s[0])):
        result = results.get(name)
        if result is None:
            continue
        label = ROW_LABELS.get(name) or f"{sizes['model']} {sizes['size']} px b{sizes['batch']} {name.split(':')[1]}"
        if result["status"] != "ok":
            rows.append([label, result["status"].upper(), result.get("error", "")])
        elif name.startswith("train:"):
            rows.append(train_row(label, result["data"], peak, device))
        else:
            rows.extend(result["rows"])
    return rows


ROWS = ["device", "input", "train:fp32", "train:bf16", "train:bf16+channels_last", "train:bf16+channels_last+compile",
        "alpa", "study", "compare"]
ROW_LABELS = {"device": "device", "input": "input", "alpa": "ALPA", "study": "study", "compare": "compare"}


def train_row(label: str, d: dict[str, Any], peak: float | None, device: dict[str, Any]) -> list[str]:
    ratio = d["real"] / d["synthetic"]
    achieved = d["flops_per_image"] * d["real"] / 1e12
    if peak:
        where = "spec" if device.get("spec_bf16_tflops") else "measured matmul"
        share = f"{achieved:.0f} TFLOP/s = {100 * achieved / peak:.1f}% of the bf16 peak ({peak:.0f}, {where})"
    else:
        share = f"{achieved:.2f} TFLOP/s"
    return [label, f"{d['real']:,.0f} img/s real input, {d['synthetic']:,.0f} on-device: ratio {ratio:.2f} "
                   f"({'meets' if ratio >= 0.95 else 'BELOW'} the 0.95 goal)",
            f"{share}; {d['flops_per_image'] / 1e9:.1f} GFLOP/img; peak memory {d['peak_memory_gib']:.1f} GiB; "
            f"warm-up {d['warmup_seconds']:.0f} s"]


def print_table(rows: list[list[str]], results: dict[str, dict[str, Any]], total: float, budget: float,
                smoke: bool) -> None:
    head = results.get("device", {}).get("data", {}).get("summary", "device unknown")
    print(f"gpu_check{' --cpu-smoke' if smoke else ''}: {head}; {total:.0f} s in all (budget {budget:.0f} s)")
    print("| check | result | detail |")
    print("|---|---|---|")
    for check, result, detail in rows:
        print(f"| {check} | {result} | {detail} |".replace("\n", " "))
    sys.stdout.flush()
    for name, result in results.items():
        if result["status"] == "error" and result.get("log"):
            print(f"\n--- {name}: end of its output ---\n{result['log'][-1500:]}")


# -- the children: one section each -----------------------------------------------------------------
def run_child(args: argparse.Namespace) -> int:
    sizes = SMOKE if args.cpu_smoke else FULL
    try:
        section = args.section.split(":")[0]
        out = SECTION_FUNCTIONS[section](args, sizes)
        result = {"status": "ok", **out}
    except Exception as exc:  # noqa: BLE001 - the row shows it; the parent goes on
        traceback.print_exc()
        result = {"status": "error", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}
    args.result.write_text(json.dumps(result, default=float))
    return 0


def _device(smoke: bool):
    import torch

    return torch.device("cpu" if smoke else "cuda")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def section_device(args: argparse.Namespace, sizes: dict[str, Any]) -> dict[str, Any]:
    import torch

    cores = os.cpu_count()
    if args.cpu_smoke or not torch.cuda.is_available():
        summary = f"CPU ({cores} cores), torch {torch.__version__}"
        cuda = None if args.cpu_smoke else False
        return {"data": {"cuda": cuda, "summary": summary}, "rows": [["device", summary, "no CUDA GPU"]]}
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    name = props.name
    spec = next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)
    n, reps = 8192, 10
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    matmul = 2 * n**3 * reps / (time.perf_counter() - start) / 1e12
    summary = (f"{name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
               f"CUDA {torch.version.cuda}, {cores} CPU cores")
    return {"data": {"cuda": True, "summary": summary, "name": name, "spec_bf16_tflops": spec, "matmul_tflops": matmul},
            "rows": [["device", f"{name}, {props.total_memory / 2**30:.0f} GiB", f"torch {torch.__version__}, CUDA "
                      f"{torch.version.cuda}, {cores} CPU cores"],
                     ["bf16 peak", f"{spec} TFLOP/s dense (datasheet)" if spec else "not in the table of known devices",
                      f"measured: {n}^3 bf16 matmul {matmul:.0f} TFLOP/s"]]}


def _tiny_config(args: argparse.Namespace):
    from alpa_tune.config import load_config

    return load_config(args.workdir / "study.toml")


def _memmap_dataset(workdir: Path):
    from alpa_tune.data import ImageDataset

    return ImageDataset(np.load(workdir / "images.npy", mmap_mode="r"), np.load(workdir / "labels.npy"),
                        [f"class_{c}" for c in range(CLASSES)], "gpu-check")


def section_input(args: argparse.Namespace, sizes: dict[str, Any]) -> dict[str, Any]:
    import warnings

    import torch

    from alpa_tune import augment, training
    from alpa_tune.data import load_dataset
    from alpa_tune.losses import build_loss

    device = _device(args.cpu_smoke)
    rows, data = [], {}
    # 1. The reader: the same bytes as direct indexing, in the order given.
    dataset = _memmap_dataset(args.workdir)
    batches = training.epoch_batches(np.arange(len(dataset.labels)), 48, torch.Generator().manual_seed(1))
    with training.BatchReader(dataset, device) as reader:
        pinned = reader.pin_memory
        same = all(torch.equal(images.cpu(), torch.from_numpy(dataset.images[b])) and
                   torch.equal(labels.cpu(), torch.from_numpy(dataset.labels[b]))
                   for (images, labels), b in zip(reader.read(batches), batches, strict=True))
    data.update(reader_identical=same, batches=len(batches), pinned=pinned)
    rows.append(["input: reader", "identical to direct indexing" if same else "DIFFERENT from direct indexing",
                 f"{len(batches)} batches from a memmap; pinned memory + side stream: {'yes' if pinned else 'no (CPU)'}"])
    # 2. Augmentation in channels_last on the device: same values as NCHW.
    x = torch.from_numpy(dataset.images[:32]).to(device)
    seeded = lambda: torch.Generator(device=device).manual_seed(3)  # noqa: E731
    cl = augment.train_transform(x, seeded(), memory_format=torch.channels_last)
    equal = torch.equal(cl, augment.train_transform(x, seeded()))
    data.update(channels_last=cl.is_contiguous(memory_format=torch.channels_last), layout_values_equal=equal)
    rows.append(["input: layout", f"channels_last: {cl.is_contiguous(memory_format=torch.channels_last)}, values equal "
                 f"to NCHW: {equal}", f"augment.train_transform on {device.type}"])
    # 3. Host syncs in one training epoch (after a warm-up epoch), and the NaN stop on the device.
    config = _tiny_config(args).replace(["training.batch_size=8"])
    tiny = load_dataset(config.data)
    index = np.arange(len(tiny.labels))
    steps = math.ceil(len(index) / 8)
    # The ALPA loss, as in a trial (on CUDA it is compiled during the warm-up epoch).
    trainer = training.Trainer(config, tiny.class_counts(), lambda c: build_loss("alpa", **PAPER_ALPA),
                               seed=0, device=device, steps_per_epoch=steps)
    gen = torch.Generator().manual_seed(0)
    with training.BatchReader(tiny, device) as reader:
        trainer.train_epoch(reader.read(training.epoch_batches(index, 8, gen)))
        if device.type == "cuda":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    trainer.train_epoch(reader.read(training.epoch_batches(index, 8, gen)))
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchroniz" in str(w.message) for w in caught)
            expected = math.ceil(steps / trainer.loss_read_steps)
            data.update(syncs=syncs, expected_syncs=expected, steps=steps)
            rows.append(["input: host syncs", f"{syncs} in an epoch of {steps} steps",
                         f"expected {expected}: the loss reads, every {trainer.loss_read_steps} steps and at the end "
                         f"(torch.cuda sync debug mode)"])
        else:
            rows.append(["input: host syncs", "n/a on CPU", "the losses are read every step there (a read costs nothing)"])

        class GoesNaN(torch.nn.Module):
            calls = 0

            def forward(self, logits, target):
                self.calls += 1
                loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
                return loss * float("nan") if self.calls > 3 else loss

        bad = GoesNaN()
        nan_trainer = training.Trainer(config, tiny.class_counts(), lambda c: bad, seed=0, device=device,
                                       steps_per_epoch=steps)
        try:
            nan_trainer.train_epoch(reader.read(training.epoch_batches(index, 8, gen)))
            rows.append(["input: NaN stop", "NOT RAISED", "a loss NaN from step 3 trained to the end"])
        except training.NonFiniteLossError as exc:
            data.update(nan_message=str(exc), nan_calls=bad.calls)
            rows.append(["input: NaN stop", f"NonFiniteLossError: {exc}", f"raised after {bad.calls} steps "
                         f"(losses read every {nan_trainer.loss_read_steps})"])
    # 4. One fold of the tiny study, scored.
    dev, _ = training.split_holdout(tiny, config.training.holdout, 0)
    train_index, eval_index = training.make_folds(tiny, dev, config.training.folds, 0)[0]
    fold = training.train_and_evaluate(config.replace(["training.epochs=3"]), tiny, train_index, eval_index,
                                       lambda c: torch.nn.CrossEntropyLoss(reduction="sum"), seed=0, device=device)
    rows.append(["input: one tiny fold", f"balanced accuracy {fold.balanced_accuracy:.3f} (chance 0.25)",
                 f"{fold.images_per_second:,.0f} img/s, resnet10t {sizes['tiny_size']} px, device {fold.device}"])
    data["fold_balanced_accuracy"] = fold.balanced_accuracy
    return {"rows": rows, "data": data}


def section_train(args: argparse.Namespace, sizes: dict[str, Any]) -> dict[str, Any]:
    import itertools

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from alpa_tune.config import StudyConfig
    from alpa_tune.losses import build_loss
    from alpa_tune.models import create_model
    from alpa_tune.training import BatchReader, Trainer, epoch_batches

    device = _device(args.cpu_smoke)
    flags = SETTINGS[args.section.split(":", 1)[1]]
    batch = sizes["batch"]
    config = StudyConfig(name="gpu-check").replace([
        f'model.backbone="{sizes["model"]}"', f"data.image_size={sizes['size']}", f"training.batch_size={batch}",
        f'training.amp="{flags["amp"]}"', f"training.channels_last={str(flags['channels_last']).lower()}",
        f"training.compile={str(flags['compile']).lower()}", 'training.optimizer="adam"', "training.lr=1e-4",
        "training.weight_decay=1e-3", "training.augment=true"])
    dataset = _memmap_dataset(args.workdir)
    index = np.arange(len(dataset.labels))
    steps = len(index) // batch

    # Model FLOPs of a training step (forward + backward), per image.
    counted = create_model(sizes["model"], CLASSES).to(device)
    with FlopCounterMode(display=False) as counter:
        counted(torch.randn(2, 3, sizes["size"], sizes["size"], device=device)).sum().backward()
    flops_per_image = counter.get_total_flops() / 2
    del counted

    trainer = Trainer(config, dataset.class_counts(), lambda c: build_loss("alpa", **PAPER_ALPA), seed=0,
                      device=device, steps_per_epoch=steps)
    on_device = (torch.randint(0, 256, (batch, sizes["size"], sizes["size"], 3), dtype=torch.uint8, device=device),
                 torch.randint(0, CLASSES, (batch,), device=device))
    gen = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with BatchReader(dataset, device) as reader:
        started = time.perf_counter()  # compilation, cuDNN's algorithm search, the allocator's first blocks
        trainer.train_epoch(reader.read(epoch_batches(index, batch, gen)[: sizes["warmup"]]))
        trainer.train_epoch(itertools.repeat(on_device, sizes["warmup"]))
        warmup = time.perf_counter() - started
        real, synthetic = [], []
        for _ in range(sizes["rounds"]):  # alternating, so both see the same conditions
            real.append(trainer.train_epoch(reader.read(epoch_batches(index, batch, gen))).images_per_second)
            synthetic.append(trainer.train_epoch(itertools.repeat(on_device, steps)).images_per_second)
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return {"data": {"real": float(np.median(real)), "synthetic": float(np.median(synthetic)),
                     "flops_per_image": flops_per_image, "warmup_seconds": warmup, "peak_memory_gib": peak_memory,
                     "steps": steps, "rounds": sizes["rounds"]}}


def section_alpa(args: argparse.Namespace, sizes: dict[str, Any]) -> dict[str, Any]:
    import random

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from loss_overhead import bench_shape, draw

    from alpa_tune.losses import build_loss

    device = _device(args.cpu_smoke)
    low = torch.float32 if device.type == "cpu" else torch.bfloat16  # CPU: no bf16 fast path worth checking
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    n, c = 4096, CLASSES
    worst: dict[str, list[float]] = {"low": [0.0, 0.0], "fp32": [0.0, 0.0]}
    for _ in range(5):  # five trials' worth of hyperparameters from the search space
        loss = build_loss("alpa", **draw(rng))
        x = (2 * torch.randn(n, c, generator=gen)).to(device=device, dtype=low)
        target = torch.randint(0, c, (n,), generator=gen).to(device)
        reference = x.double().requires_grad_()
        value64 = loss(reference, target)
        value64.backward()
        for key, dtype in (("low", low), ("fp32", torch.float32)):
            logits = x.to(dtype, copy=True).requires_grad_()
            value = loss(logits, target)
            value.backward()
            loss_error = abs(value.double().item() - value64.item()) / abs(value64.item())
            grad_error = ((logits.grad.double() - reference.grad).abs().max() / reference.grad.abs().max()).item()
            worst[key] = [max(worst[key][0], loss_error), max(worst[key][1], grad_error)]
    rounds = 2 if args.cpu_smoke else 30
    timing = {shape: bench_shape(*shape, device, low, rounds, 5, 0) for shape in ((128, c), (4096, c))}
    low_name = str(low).removeprefix("torch.")
    rows = [["ALPA: accuracy", f"{low_name} vs float64: loss rel. error {worst['low'][0]:.1e}, gradient "
             f"{worst['low'][1]:.1e} (of its max); fp32 (the training path): {worst['fp32'][0]:.1e}, {worst['fp32'][1]:.1e}",
             f"({n}, {c}) logits ~ N(0, 4), 5 settings drawn from the search space, on {device.type}"],
            ["ALPA: speed", "; ".join(f"({a}, {b}): ALPA {r['alpa']:.0f} us vs BCE {r['bce']:.0f} us = {r['alpa / bce']:.2f}x"
                                      for (a, b), r in timing.items()),
             f"forward+backward, {low_name} on {device.type}, best round (benchmarks/loss_overhead.py)"]]
    return {"rows": rows, "data": {"errors": worst, "timing": {f"{a}x{b}": r for (a, b), r in timing.items()}}}


def _cli(args: argparse.Namespace, *words: str, timeout: float) -> str:
    """Run ``alpa-tune WORDS`` in the work folder; its output, or an error naming its last line."""
    process = subprocess.Popen([sys.executable, "-m", "alpa_tune", *words], cwd=args.workdir, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env(args.cpu_smoke))
    try:
        output = process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        stop(process, group=False)
        raise RuntimeError(f"alpa-tune {words[0]} still running after {timeout:.0f} s: stopped") from None
    if process.returncode != 0:
        tail = output.strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"alpa-tune {words[0]} exited {process.returncode}: {tail[0][:200]}")
    return output


def _storage(args: argparse.Namespace) -> str:
    return f"sqlite:///{args.workdir / 'study.db'}"


def section_study(args: argparse.Namespace, sizes: dict[str, Any]) -> dict[str, Any]:
    import optuna

    from alpa_tune.study import finished, study_budget

    storage = _storage(args)
    _cli(args, "study", "create", "study.toml", "--storage", storage, timeout=120)
    where = ["--workers", "2"] if args.cpu_smoke else ["--gpus", "0", "--workers-per-gpu", "2"]
    started = time.perf_counter()
    try:
        _cli(args, "launch", "gpu-check", "--storage", storage, *where, "--log-dir", "logs", timeout=240)
    except RuntimeError:
        for log in sorted((args.workdir / "logs").glob("*.log")):  # into this check's output, shown on error
            print(f"--- {log.name}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        raise
    seconds = time.perf_counter() - started
    study = optuna.load_study(study_name="gpu-check", storage=storage)
    counts = {state: 0 for state in optuna.trial.TrialState}
    for trial in study.trials:
        counts[trial.state] += 1
    done, budget = finished(counts), study_budget(study)
    devices = sorted({str(t.user_attrs.get("device")) for t in study.trials if t.state.is_finished()})
    workers = len({t.user_attrs.get("worker") for t in study.trials if t.state.is_finished()})
    _cli(args, "export", "gpu-check", "--storage", storage, "-o", "best.json", timeout=60)
    return {"rows": [[f"study: {' '.join(where)}", f"{done}/{budget} trials finished ({counts[optuna.trial.TrialState.COMPLETE]} "
                      f"complete, {counts[optuna.trial.TrialState.FAIL]} failed) in {seconds:.0f} s"
                      + ("" if done == budget else " - BUDGET NOT MET"),
                      f"{workers} workers, devices {', '.join(devices)}; best {study.best_value:.3f}; embedded SQLite"]],
            "data": {"finished": done, "budget": budget, "seconds": seconds, "devices": devices}}


def section_compare(args: argparse.Namespace, sizes: dict[str, Any]) -> dict[str, Any]:
    best = args.workdir / "best.json"
    note = "best.json from the study above"
    if not best.exists():  # the study check failed: compare the paper's point instead
        best.write_text(json.dumps({"loss": "alpa", "params": PAPER_ALPA}))
        note = "best.json written by hand (the study check gave none)"
    started = time.perf_counter()
    # Default --workers: one process per GPU (in this process when there is one GPU). The smoke
    # run takes that one-process path too, rather than one process per core.
    workers = ["--workers", "1"] if args.cpu_smoke else []
    _cli(args, "compare", "study.toml", "--best", "best.json", "--losses", "ce,alpa", "--seeds", "1",
         "--storage", _storage(args), "-o", "cmp/tiny", *workers, timeout=240)
    seconds = time.perf_counter() - started
    comparison = json.loads((args.workdir / "cmp" / "tiny.json").read_text())
    devices = sorted({run["device"] for run in comparison["runs"]})
    failed = [run["loss"] for run in comparison["runs"] if "error" in run]
    accuracy = ", ".join(f"{run['loss']} {run['balanced_accuracy']:.3f}" for run in comparison["runs"] if "error" not in run)
    return {"rows": [["compare: ce vs alpa, 1 seed", f"{len(comparison['runs'])} trainings in {comparison['workers']} "
                      f"process(es) on {', '.join(devices)} in {seconds:.0f} s" + (f"; FAILED: {failed}" if failed else ""),
                      f"held-out balanced accuracy {accuracy}; {note}"]],
            "data": {"workers": comparison["workers"], "devices": devices, "seconds": seconds}}


SECTION_FUNCTIONS = {"device": section_device, "input": section_input, "train": section_train, "alpa": section_alpa,
                     "study": section_study, "compare": section_compare}


if __name__ == "__main__":
    raise SystemExit(main())
