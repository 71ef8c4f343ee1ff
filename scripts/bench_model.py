"""Forward+backward speed of the Falcon-H1 model: lrm=none vs lrm=full, and transformers' FalconH1 as the outside
reference at the same shape, all in one run.

    python scripts/bench_model.py [--preset tiny] [--batch 8] [--seq-len 256] [--steps 10]

The variants are timed in interleaved rounds (the median step of each is reported), so a slow moment of the machine
hits all of them alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from lrm_train.hf import export_hf
from lrm_train.models import FalconH1LM, preset
from lrm_train.nn import LRMConfig, lm_loss


def step_fn(forward, params, ids):
    def step() -> None:
        for p in params:
            p.grad = None
        lm_loss(forward(ids[:, :-1]), ids[:, 1:]).loss.backward()

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    args = parser.parse_args()
    cfg = preset(args.preset)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1))
    variants = {}
    for placement in ("none", "full"):
        model = FalconH1LM(cfg, LRMConfig(placement))
        variants[f"lrm={placement}"] = step_fn(model, list(model.parameters()), ids)
    if not args.no_hf:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers import FalconH1ForCausalLM

        with tempfile.TemporaryDirectory() as tmp:
            export_hf(FalconH1LM(cfg, LRMConfig("none")), f"{tmp}/hf")
            hf = FalconH1ForCausalLM.from_pretrained(f"{tmp}/hf").train()
        variants["transformers FalconH1"] = step_fn(lambda x: hf(x).logits, list(hf.parameters()), ids)

    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.warmup + args.steps):
        for name, step in variants.items():
            start = time.perf_counter()
            step()
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - start)

    tokens = args.batch * args.seq_len
    base = statistics.median(times["lrm=none"])
    print(
        f"preset={args.preset} batch={args.batch} seq_len={args.seq_len} threads={torch.get_num_threads()} "
        f"device=cpu dtype=float32 steps={args.steps} (median)"
    )
    print(f"{'variant':<24}{'step ms':>10}{'tokens/s':>12}{'vs lrm=none':>14}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<24}{1e3 * median:>10.1f}{tokens / median:>12.0f}{median / base:>13.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
