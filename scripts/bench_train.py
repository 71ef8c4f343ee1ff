"""Full training-step speed (data, forward, backward, clipping, optimizer) in one run, as ratios:
AdamW vs Muon, and lrm=none vs lrm=full.

    python scripts/bench_train.py [--model tiny] [--micro-batch 8] [--seq-len 256] [--steps 10]

Each variant is a real ``Trainer`` (parameter classes, optimizer, engine, loader) on the default corpus; their steps
are timed in interleaved rounds and the median is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import tempfile
import time

import torch

from lrm_train.train import compose, open_trainer

VARIANTS = {
    "adamw, lrm=none": ("adamw", "none"),
    "adamw, lrm=full": ("adamw", "full"),
    "muon, lrm=none": ("muon", "none"),
    "muon, lrm=full": ("muon", "full"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--data-root", default="data", help="where the default corpus is prepared (reused)")
    args = parser.parse_args()
    logging.disable(logging.INFO)  # the trainers' start-up tables

    trainers = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        for name, (optimizer, placement) in VARIANTS.items():
            cfg = compose(
                [
                    f"model={args.model}",
                    f"optim={optimizer}",
                    f"lrm={placement}",
                    f"data.out_root={args.data_root}",
                    f"data.seq_len={args.seq_len}",
                    f"train.micro_batch_size={args.micro_batch}",
                    "train.max_steps=10000",
                    f"train.run_dir={tmp}/{optimizer}-{placement}",
                    "train.resume=none",
                    "logging.progress=false",
                    "logging.wandb.mode=disabled",
                ]
            )
            trainers[name] = stack.enter_context(open_trainer(cfg))

        times: dict[str, list[float]] = {name: [] for name in trainers}
        for round_ in range(args.warmup + args.steps):
            for name, trainer in trainers.items():
                started = time.perf_counter()
                trainer.train_step()
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - started)

    tokens = args.micro_batch * args.seq_len
    median = {name: statistics.median(samples) for name, samples in times.items()}
    print(
        f"model={args.model} batch={args.micro_batch}x{args.seq_len} threads={torch.get_num_threads()} "
        f"device=cpu float32, median of {args.steps} steps"
    )
    print(f"{'variant':<20}{'step ms':>10}{'tokens/s':>12}")
    for name, seconds in median.items():
        print(f"{name:<20}{1e3 * seconds:>10.1f}{tokens / seconds:>12.0f}")
    print("ratios (step time):")
    for placement in ("none", "full"):
        ratio = median[f"muon, lrm={placement}"] / median[f"adamw, lrm={placement}"]
        print(f"  muon / adamw, lrm={placement}: {ratio:.3f}x")
    for optimizer in ("adamw", "muon"):
        ratio = median[f"{optimizer}, lrm=full"] / median[f"{optimizer}, lrm=none"]
        print(f"  lrm=full / lrm=none, {optimizer}: {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
