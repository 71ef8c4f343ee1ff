"""Training-step speed, MFU and peak memory of the real trainer, one factor changed at a time, with transformers'
FalconH1 at the same shape as the outside reference - all in one run, printed as ratios.

    python scripts/bench_gpu.py                          # CUDA: falcon_h1_0p5b at seq 4096; CPU: tiny at seq 256
                                                         # (micro-batch 8, or the largest of 4, 2, 1 that fits)
    python scripts/bench_gpu.py --preset falcon_h1_0p5b --seq-len 4096 --micro-batch 4 --steps 10
    python scripts/bench_gpu.py --variants base,lrm=none  # a subset

The reference configuration (``base``) is lrm=full, AdamW, compiled decoder layers, the SSD scan backend ``auto``
and LM-head loss backends ``auto`` (Triton on CUDA). Every other variant changes one thing: ``lrm=none``, ``muon``,
``eager`` (no torch.compile), ``torch scan`` (the plain-PyTorch SSD scan), ``torch LM loss`` (the chunked PyTorch
cross-entropy instead of the fused kernel), ``chunk 256`` (the SSD scan in chunks of 256: the same result, half the
chunk states), ``transformers`` (FalconH1ForCausalLM with torch's fused AdamW, same
shape, same precision: bf16 autocast on CUDA, float32 on CPU).

Each variant runs in its own process (so its peak memory is its own and nothing is left compiled or cached), on the
default corpus (prepared once under ``--data-root``); the median of the timed steps is reported. MFU is the model's
training FLOPs per token (``FalconH1LM.flops_per_token``: every matmul, attention as a causal kernel runs it, the
SSD scan as it runs) times tokens/s over the device's dense bf16 peak (``--peak-tflops`` for a device not in the
table).
On CPU the figures are for the tiny preset and MFU is not defined.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

OUT_OF_MEMORY = re.compile(r"out of memory|OutOfMemoryError", re.IGNORECASE)
# Dense bf16 tensor-core peak (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}

BASE = ["lrm=full", "optim=adamw", "train.compile=true", "model.ssd_backend=auto", "model.lm_loss_backend=auto"]
VARIANTS = {
    "base": [],
    "lrm=none": ["lrm=none"],
    "muon": ["optim=muon"],
    "eager": ["train.compile=false"],
    "torch scan": ["model.ssd_backend=torch"],
    "torch LM loss": ["model.lm_loss_backend=torch"],
    "chunk 256": ["model.mamba_chunk_size=256"],
    "transformers": None,  # the outside reference
}
# (numerator, denominator, what it measures, target as "at most this ratio of step times")
RATIOS = [
    ("base", "lrm=none", "LRM overhead (lrm=full / lrm=none)", 1.02),
    ("muon", "base", "Muon / AdamW", 1.10),
    ("base", "eager", "compiled / eager", None),
    ("base", "torch scan", "Triton scan / torch scan (whole step)", None),
    ("base", "torch LM loss", "fused Triton LM loss / PyTorch chunked loss (whole step)", None),
    ("chunk 256", "base", "SSD chunk 256 / chunk 128 (whole step)", None),
    ("base", "transformers", "ours / transformers", 1.0),
]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process's peak RSS (KiB on Linux)


def time_steps(step, device: torch.device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return times


def trainer_overrides(args, variant: str, run_dir: str) -> list[str]:
    return [
        f"model={args.preset}",
        *BASE,
        *VARIANTS[variant],
        f"data.out_root={args.data_root}",
        f"data.seq_len={args.seq_len}",
        "data.val_windows=1",
        f"train.micro_batch_size={args.micro_batch}",
        "train.max_steps=100000",
        "train.eval_every=100000",
        "train.ckpt_every=100000",
        "train.log_every=100000",
        f"train.run_dir={run_dir}",
        "train.resume=none",
        "logging.progress=false",
        "logging.wandb.mode=disabled",
        *(["train.compile=false"] if args.eager else []),
    ]


def measure_trainer(args, variant: str) -> dict:
    from lrm_train.train import compose, open_trainer

    with tempfile.TemporaryDirectory() as tmp, open_trainer(compose(trainer_overrides(args, variant, tmp))) as trainer:
        device = trainer.engine.device
        times = time_steps(trainer.train_step, device, args.warmup, args.steps)
        return {
            "seconds": statistics.median(times),
            "flops_per_token": trainer.components.flops_per_token,
            "peak_gb": peak_memory_gb(device),
            "device": device.type,
        }


def measure_transformers(args) -> dict:
    """transformers' FalconH1 at our shape (exported from our lrm=none model), with torch's AdamW, same precision."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import FalconH1ForCausalLM

    from lrm_train.hf import export_hf
    from lrm_train.models import FalconH1LM, preset
    from lrm_train.nn import LRMConfig, lm_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(FalconH1LM(cfg, LRMConfig("none")), f"{tmp}/hf")
        model = FalconH1ForCausalLM.from_pretrained(f"{tmp}/hf").to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq_len + 1), device=device)
    precision = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step() -> None:
        with precision:
            loss = lm_loss(model(ids[:, :-1]).logits, ids[:, 1:], 1e-4).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = time_steps(step, device, args.warmup, args.steps)
    return {"seconds": statistics.median(times), "peak_gb": peak_memory_gb(device), "device": device.type}


def run_variant_in_subprocess(args, variant: str) -> dict:
    command = [sys.executable, __file__, "--one", variant, *sys.argv[1:], "--micro-batch", str(args.micro_batch)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.variant_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.variant_timeout:g} s (--variant-timeout)"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": last}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_at_a_size_that_fits(args, variants: list[str]) -> dict[str, dict]:
    """Every variant at ``args.micro_batch``; with the default (0), at the largest of 8, 4, 2, 1 at which the first
    variant does not run out of memory (at 0.5B x seq 4096, batch 8 needs ~81-104 GiB of activations: too much for an
    80 GB H100, enough for an H200)."""
    sizes = [args.micro_batch] if args.micro_batch else [8, 4, 2, 1]
    for size in sizes:
        args.micro_batch, results = size, {}
        for variant in variants:
            print(f"measuring {variant} at micro-batch {args.micro_batch} ...", file=sys.stderr, flush=True)
            results[variant] = run_variant_in_subprocess(args, variant)
            if OUT_OF_MEMORY.search(results[variant].get("error", "")) and variant == variants[0]:
                break  # a smaller batch, if there is one left, for every variant
        else:
            return results
    return results


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def summarize(args, results: dict[str, dict]) -> dict:
    """Every figure of the run as plain data: per variant tokens/s and MFU, the ratios against their targets."""
    peak = peak_tflops(args)
    tokens = args.micro_batch * args.seq_len
    flops = next((r["flops_per_token"] for r in results.values() if "flops_per_token" in r), None)
    variants = {}
    for name, r in results.items():
        if "error" in r:
            variants[name] = {"error": r["error"]}
            continue
        mfu = flops * tokens / r["seconds"] / (peak * 1e12) if peak and flops else None
        variants[name] = {**r, "tokens_per_s": tokens / r["seconds"], "mfu": mfu}
    ratios = []
    for numerator, denominator, what, target in RATIOS:
        if "seconds" in results.get(numerator, {}) and "seconds" in results.get(denominator, {}):
            ratio = results[numerator]["seconds"] / results[denominator]["seconds"]
            met = None if target is None else ratio <= target
            ratios.append({"what": what, "ratio": ratio, "target_at_most": target, "met": met})
    base_mfu = variants.get("base", {}).get("mfu")
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "preset": args.preset,
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_tflops": peak,
        "variants": variants,
        "ratios": ratios,
        "mfu_target": {"at_least": 0.40, "base": base_mfu, "met": None if base_mfu is None else base_mfu >= 0.40},
    }


def report(summary: dict) -> None:
    s = summary
    print(
        f"device={s['device']} preset={s['preset']} batch={s['micro_batch']}x{s['seq_len']} "
        f"median of {s['steps']} steps after {s['warmup']}; peak bf16 {s['peak_tflops'] or 'unknown'} TFLOP/s"
    )
    print(f"{'variant':<14}{'step ms':>10}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}")
    for name, r in s["variants"].items():
        if "error" in r:
            print(f"{name:<14}  failed: {r['error']}")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"{name:<14}{1e3 * r['seconds']:>10.1f}{r['tokens_per_s']:>12.0f}{mfu:>8}{r['peak_gb']:>10.2f}")
    print("ratios of step time:")
    for r in s["ratios"]:
        verdict = (
            "" if r["met"] is None else f"  (target <= {r['target_at_most']:.2f}x: {'met' if r['met'] else 'missed'})"
        )
        print(f"  {r['what']:<40}{r['ratio']:>7.3f}x{verdict}")
    if s["mfu_target"]["met"] is not None:
        met = "met" if s["mfu_target"]["met"] else "missed"
        print(f"  MFU of base (lrm=full){'':<18}{s['mfu_target']['base']:>7.1%}  (target >= 40%: {met})")


def main() -> int:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="falcon_h1_0p5b" if gpu else "tiny")
    parser.add_argument("--seq-len", type=int, default=4096 if gpu else 256)
    parser.add_argument(
        "--micro-batch", type=int, default=0, help="0 (default): 8, halved while the first variant runs out of memory"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS)
    )
    parser.add_argument("--data-root", default="data", help="where the default corpus is prepared (reused)")
    parser.add_argument(
        "--eager", action="store_true", help="no torch.compile in any variant (a quick functional run, e.g. on CPU)"
    )
    parser.add_argument(
        "--variant-timeout", type=float, default=None, help="seconds before a variant is given up (a short GPU lease)"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, TFLOP/s")
    parser.add_argument("--json", default=None, help="also write every figure to this file (scripts/gpu_check.py)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one variant, print JSON
    args = parser.parse_args()
    chosen = args.variants.split(",")
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if args.one is not None:
        logging.disable(logging.INFO)  # the trainer's start-up tables
        result = measure_transformers(args) if args.one == "transformers" else measure_trainer(args, args.one)
        print(json.dumps(result))
        return 0
    results = measure_at_a_size_that_fits(args, chosen)
    summary = summarize(args, results)
    report(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
