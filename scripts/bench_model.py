"""Forward+backward speed of the Falcon-H1 model: lrm=none vs lrm=full, the loss from full logits (``lm_loss`` on
``model(x)``) vs the trainer's chunked loss (``model(x, targets)``), and transformers' FalconH1 as the outside reference
at the same shape, all in one run.

    python scripts/bench_model.py [--preset tiny] [--batch 8] [--seq-len 256] [--steps 10] [--compile]

``--compile`` adds ``lrm=full`` with every decoder layer compiled (``train.compile``; inductor's first build takes
minutes on a CPU, outside the timed steps).

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
from lrm_train.train.build import wrap_layers

Z_LOSS = 1e-4  # the trainer's default


def step_fn(loss_fn, params, ids):
    def step() -> None:
        for p in params:
            p.grad = None
        loss_fn(ids[:, :-1], ids[:, 1:]).loss.backward()

    return step


def full_logits_loss(logits_fn):
    return lambda x, y: lm_loss(logits_fn(x), y, Z_LOSS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    parser.add_argument("--compile", action="store_true", help="add lrm=full with compiled decoder layers")
    args = parser.parse_args()
    cfg = preset(args.preset)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1))
    variants = {}
    models = {placement: FalconH1LM(cfg, LRMConfig(placement)) for placement in ("none", "full")}
    for placement, model in models.items():
        variants[f"lrm={placement}"] = step_fn(lambda x, y, m=model: m(x, y, Z_LOSS), list(model.parameters()), ids)
    # The same model, its loss taken from the full logits (the trainer's loss before the chunked LM head).
    full = models["full"]
    variants["lrm=full, full logits"] = step_fn(full_logits_loss(full), list(full.parameters()), ids)
    if args.compile:
        compiled = FalconH1LM(cfg, LRMConfig("full"))
        wrap_layers(compiled.layers, compile=True, activation_checkpointing=False)
        variants["lrm=full, compiled"] = step_fn(lambda x, y: compiled(x, y, Z_LOSS), list(compiled.parameters()), ids)
    if not args.no_hf:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers import FalconH1ForCausalLM

        with tempfile.TemporaryDirectory() as tmp:
            export_hf(FalconH1LM(cfg, LRMConfig("none")), f"{tmp}/hf")
            hf = FalconH1ForCausalLM.from_pretrained(f"{tmp}/hf").train()
        variants["transformers FalconH1"] = step_fn(
            full_logits_loss(lambda x: hf(x).logits), list(hf.parameters()), ids
        )

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
    print(f"{'variant':<26}{'step ms':>10}{'tokens/s':>12}{'vs lrm=none':>14}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<26}{1e3 * median:>10.1f}{tokens / median:>12.0f}{median / base:>13.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
