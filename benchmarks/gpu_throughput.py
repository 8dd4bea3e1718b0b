"""Training images/s of the paper's backbone on one GPU, per precision/layout/compile setting.

ConvNeXt-B at 256 x 256, batch 128 (the paper's setup), full training steps: uint8 batch
already on the device -> ``train_transform`` (on the GPU) -> forward -> loss -> backward ->
AdamW step. Settings, each adding to the previous one:

    fp32 | bf16 (autocast) | bf16 + channels_last | bf16 + channels_last + torch.compile

    python benchmarks/gpu_throughput.py [--model convnext_base] [--size 256] [--batch-size 128]

Without a CUDA GPU it exits with a message (status 1); ``--device cpu`` runs a smoke test
(use a small ``--model`` and ``--size`` there).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alpa_tune.augment import train_transform  # noqa: E402

SETTINGS = {
    "fp32": {"bf16": False, "channels_last": False, "compile": False},
    "bf16": {"bf16": True, "channels_last": False, "compile": False},
    "bf16+channels_last": {"bf16": True, "channels_last": True, "compile": False},
    "bf16+channels_last+compile": {"bf16": True, "channels_last": True, "compile": True},
}


def measure(args: argparse.Namespace, device: torch.device, bf16: bool, channels_last: bool, compile: bool) -> float:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=args.classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)
    step_model = torch.compile(model) if compile else model
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, args.size, args.size, 3), dtype=torch.uint8, device=device)
    targets = torch.randint(0, args.classes, (args.batch_size,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        x = train_transform(images, gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(step_model(x), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):  # compile, cudnn autotuning, allocator warm-up
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="convnext_base")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=17)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per setting")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", choices=list(SETTINGS), action="append", help="run just these settings")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_throughput: no CUDA GPU is visible (torch.cuda.is_available() is False); "
              "run it on a GPU machine, or pass --device cpu for a smoke test", file=sys.stderr)
        raise SystemExit(1)
    torch.backends.cudnn.benchmark = True
    # fp32 runs with PyTorch's default precision settings (cuDNN may use TF32 for convolutions).
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model} at {args.size} px, batch {args.batch_size}, on {name}, torch {torch.__version__}")
    baseline = None
    for label in args.only or SETTINGS:
        try:
            rate = measure(args, device, **SETTINGS[label])
        except torch.OutOfMemoryError:
            print(f"{label:28s}  out of memory")
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        baseline = baseline or rate
        print(f"{label:28s} {rate:9,.0f} img/s  ({rate / baseline:.2f}x)")


if __name__ == "__main__":
    main()
