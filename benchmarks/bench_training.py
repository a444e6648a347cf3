"""Training-step benchmark: one optimiser step as the baseline, and the weight-average update as a ratio to it.

The weight average (``--model-ema``) is updated every ``--model-ema-steps`` steps. Updated tensor by tensor in
Python it launches a few small kernels per tensor (ResNet-152: ~930 parameters and buffers);
``model.training.ExponentialMovingAverage`` does one fused ``lerp`` per (device, dtype) group instead. Both are
timed round-robin with the step itself.

    .venv/bin/python benchmarks/bench_training.py --arch resnet18 --image-size 64      # CPU, a minute
    python benchmarks/bench_training.py --device cuda --arch resnet152 --image-size 224 --batch-size 64
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.optim.swa_utils import AveragedModel  # noqa: E402

from model.engine import backward_and_step  # noqa: E402
from model.network import build_model  # noqa: E402
from model.training import ExponentialMovingAverage  # noqa: E402

DEFAULT_OUTPUT_DIR = REPO_ROOT / "artifacts" / "benchmarks"
DECAY = 0.999


def get_args_parser():
    """Command-line options of the training benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--arch", default="resnet152")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 on cuda, 8 on cpu")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per figure")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default all cores)")
    parser.add_argument("--output", default=None, help="JSON file (default artifacts/benchmarks/training-<time>.json)")
    return parser


class PerTensorAverage(AveragedModel):
    """The weight average as first written: a Python function applied tensor by tensor (the old baseline)."""

    def __init__(self, network, decay):
        super().__init__(network, avg_fn=lambda averaged, current, _: decay * averaged + (1.0 - decay) * current,
                         use_buffers=True)


def main(args):
    """Time a training step and both weight-average updates round-robin; print ratios, write JSON."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
    network = build_model(args.arch, 3, "none").to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    criterion = nn.CrossEntropyLoss()
    images = torch.randn(batch_size, 3, args.image_size, args.image_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 3, (batch_size,), device=device)
    averages = {"per_tensor": PerTensorAverage(network, DECAY), "foreach": ExponentialMovingAverage(network, DECAY)}

    def train_step():
        with torch.autocast(device_type=device.type, enabled=scaler is not None):
            loss = criterion(network(images), targets)
        backward_and_step(loss, optimizer, scaler)

    functions = {
        "train step (baseline)": train_step,
        "weight average, per tensor": lambda: averages["per_tensor"].update_parameters(network),
        "weight average, foreach": lambda: averages["foreach"].update_parameters(network),
    }
    seconds = time_round_robin(functions, args.rounds, device)
    baseline = statistics.median(seconds["train step (baseline)"])
    rows = []
    for name, values in seconds.items():
        median = statistics.median(values)
        rows.append({"name": name, "ms": median * 1000, "ratio_to_step": median / baseline})
    step_with = {kind: baseline + statistics.median(seconds[f"weight average, {kind}"])
                 for kind in ("per tensor", "foreach")}
    speedup = step_with["per tensor"] / step_with["foreach"]
    print(f"\n{args.arch}, {args.image_size} px, batch {batch_size}, {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'})")
    print(f"{'figure':<30} {'ms':>9} {'x step':>8}")
    for row in rows:
        print(f"{row['name']:<30} {row['ms']:>9.2f} {row['ratio_to_step']:>8.3f}")
    print(f"step + average: {speedup:.2f}x faster with foreach "
          f"({step_with['per tensor'] * 1000:.1f} -> {step_with['foreach'] * 1000:.1f} ms)")
    report = {
        "arch": args.arch, "image_size": args.image_size, "batch_size": batch_size, "device": str(device),
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "rows": rows, "step_with_average_speedup": speedup,
    }
    output = Path(args.output or DEFAULT_OUTPUT_DIR / f"training-{time.strftime('%Y%m%d-%H%M%S')}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"wrote {output}")
    return report


def time_round_robin(functions, rounds, device, *, warmup=2):
    """Seconds per call of each function, interleaved so that outside load slows all of them alike."""
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for function in functions.values():
            function()
    synchronize()
    seconds = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            synchronize()
            start = time.perf_counter()
            function()
            synchronize()
            seconds[name].append(time.perf_counter() - start)
    return seconds


if __name__ == "__main__":
    main(get_args_parser().parse_args())
