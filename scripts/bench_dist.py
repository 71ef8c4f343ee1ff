"""Throughput and memory per rank of DDP, DeepSpeed ZeRO-1/2/3 and FSDP2, with AdamW and with Muon, at one batch; with
``--checkpoints``, the training stall of a checkpoint save, synchronous vs asynchronous.

    python scripts/bench_dist.py [--nproc 2] [--model tiny] [--micro-batch 8] [--seq-len 256] [--steps 6]
                                 [--engines ddp,zero3] [--optims muon] [--checkpoints [--saves 3]]

Each configuration runs under torchrun on whatever is present (CPU processes over gloo here; one process per GPU
over NCCL on a GPU machine), as a real ``Trainer`` step (data, forward, backward, clipping, optimizer). Per rank it
reports the median step time, the optimizer state it holds (what ZeRO and FSDP shard), how many matrices it
orthogonalized per step (Muon: each rank takes its share) and its peak memory: ``torch.cuda.max_memory_allocated`` on
GPUs, the process's peak resident set (``getrusage``) on CPU, which includes Python, torch and DeepSpeed themselves.

``--checkpoints`` saves ``--saves`` times per configuration, each way, and reports per save the time the step boundary
waits (sync: the whole write; async: the copy to host memory and the folder's creation) and the total stall: that,
plus what the steps taken during a background write lose to it (their time above the median step), plus the
completion (manifest and rename) on the training thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ("ddp", "zero1", "zero2", "zero3", "fsdp")
OPTIMIZERS = ("adamw", "muon")


def worker(args) -> None:
    import logging

    from lrm_train.train import compose, open_trainer

    logging.disable(logging.INFO)
    cfg = compose(
        [
            f"model={args.model}",
            f"dist={args.engine}",
            f"optim={args.optim}",
            f"data.out_root={args.data_root}",
            f"data.seq_len={args.seq_len}",
            f"train.micro_batch_size={args.micro_batch}",
            "train.max_steps=10000",
            "train.resume=none",
            f"train.run_dir={args.out}/run-{args.engine}-{args.optim}",
            "logging.progress=false",
            "logging.wandb.mode=disabled",
        ]
    )
    with open_trainer(cfg) as trainer:
        (_measure_saves if args.checkpoints else _measure)(trainer, args)


def _measure_saves(trainer, args) -> None:
    engine, checkpointer = trainer.engine, trainer.checkpointer
    for _ in range(args.warmup):
        trainer.train_step()
    step_times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        trainer.train_step()
        step_times.append(time.perf_counter() - started)
    median = statistics.median(step_times)
    result = {"step_s": median, "device": engine.device.type}
    for mode in ("sync", "async"):
        boundary, total = [], []
        for _ in range(args.saves):
            engine.barrier()
            started = time.perf_counter()
            checkpointer.save(trainer, background=mode == "async")
            boundary.append(time.perf_counter() - started)
            stall = boundary[-1]
            while checkpointer.pending is not None:  # training goes on while the write does
                started = time.perf_counter()
                trainer.train_step()
                stall += max(0.0, time.perf_counter() - started - median)
                if not engine.max_over_ranks([not checkpointer.pending.written()])[0]:
                    started = time.perf_counter()
                    checkpointer.finish_pending(trainer)
                    stall += time.perf_counter() - started
            total.append(stall)
            trainer.train_step()
        result[mode] = {"boundary_s": statistics.median(boundary), "stall_s": statistics.median(total)}
    folder = checkpointer.last
    result["checkpoint_bytes"] = sum(f.stat().st_size for f in folder.iterdir())
    Path(args.out, f"{args.engine}-{args.optim}-rank{engine.rank}.json").write_text(json.dumps(result))


def _measure(trainer, args) -> None:
    import resource

    import torch

    from lrm_train.optim import muon

    engine, cfg = trainer.engine, trainer.cfg
    real_newton_schulz, orthogonalized = muon.newton_schulz, []

    def counted_newton_schulz(*a, **k):
        orthogonalized.append(1)
        return real_newton_schulz(*a, **k)

    muon.newton_schulz = counted_newton_schulz
    times = []
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        trainer.train_step()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()  # steps run ahead of the host: time what the device did
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    muon.newton_schulz = real_newton_schulz
    state = engine.client.state if hasattr(engine, "client") else engine.optimizer.state
    state_bytes = sum(t.numel() * t.element_size() for s in state.values() for t in s.values() if torch.is_tensor(t))
    if engine.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(engine.device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "step_s": statistics.median(times),
        "tokens": trainer.components.global_batch * cfg.data.seq_len,
        "optimizer_state_bytes": state_bytes,
        "peak_bytes": peak,
        "orthogonalized_per_step": len(orthogonalized) / (args.warmup + args.steps),
        "device": engine.device.type,
    }
    Path(args.out, f"{args.engine}-{args.optim}-rank{engine.rank}.json").write_text(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=0, help="processes (default: GPUs, or 2 on CPU)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    parser.add_argument("--optims", default=",".join(OPTIMIZERS), help="comma-separated subset of adamw,muon")
    parser.add_argument("--checkpoints", action="store_true", help="measure the stall of sync vs async saves")
    parser.add_argument("--saves", type=int, default=3, help="saves per configuration and mode (--checkpoints)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--optim", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    import torch

    nproc = args.nproc or torch.cuda.device_count() or 2
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for engine in args.engines.split(","):
            for optim in args.optims.split(","):
                command = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    f"--nproc_per_node={nproc}",
                    __file__,
                    "--worker",
                    "--engine",
                    engine,
                    "--optim",
                    optim,
                    "--out",
                    out,
                    "--model",
                    args.model,
                    "--micro-batch",
                    str(args.micro_batch),
                    "--seq-len",
                    str(args.seq_len),
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    "--data-root",
                    args.data_root,
                    "--saves",
                    str(args.saves),
                    *(["--checkpoints"] if args.checkpoints else []),
                ]
                done = subprocess.run(
                    command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
                )
                if done.returncode:
                    print(done.stderr[-3000:], file=sys.stderr)
                    return done.returncode
                ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob(f"{engine}-{optim}-rank*.json"))]
                results[engine, optim] = ranks
    if args.checkpoints:
        _print_saves(results, args, nproc)
        return 0
    first = next(iter(results.values()))[0]
    peak_label = "peak CUDA alloc/rank MB" if first["device"] == "cuda" else "peak RSS/rank MB"
    print(
        f"model={args.model} ranks={nproc} device={first['device']} global batch={first['tokens']} "
        f"tokens, float32 master weights, median of {args.steps} steps"
    )
    print(
        f"{'engine':<8}{'optim':<7}{'step ms':>9}{'tokens/s':>10}{'vs ddp':>8}{'opt state/rank MB':>19}"
        f"{'NS/rank/step':>14}{peak_label:>{len(peak_label) + 2}}"
    )
    for (engine, optim), ranks in results.items():
        step = max(r["step_s"] for r in ranks)
        base = results.get(("ddp", optim))
        versus = f"{step / max(r['step_s'] for r in base):>7.2f}x" if base else f"{'-':>8}"
        state = max(r["optimizer_state_bytes"] for r in ranks) / 2**20
        orthogonalized = max(r["orthogonalized_per_step"] for r in ranks)
        peak = max(r["peak_bytes"] for r in ranks) / 2**20
        print(
            f"{engine:<8}{optim:<7}{1e3 * step:>9.0f}{ranks[0]['tokens'] / step:>10.0f}{versus}"
            f"{state:>19.2f}{orthogonalized:>14.0f}{peak:>{len(peak_label) + 2}.0f}"
        )
    return 0


def _print_saves(results, args, nproc) -> None:
    first = next(iter(results.values()))[0]
    print(
        f"model={args.model} ranks={nproc} device={first['device']}: training stall per checkpoint save, median of "
        f"{args.saves} saves (the slowest rank)"
    )
    print(
        f"{'engine':<8}{'optim':<7}{'step ms':>9}{'ckpt MB':>9}{'mode':>7}{'at the step ms':>16}{'total stall ms':>16}"
    )
    for (engine, optim), ranks in results.items():
        step = max(r["step_s"] for r in ranks)
        size = ranks[0]["checkpoint_bytes"] / 2**20
        for mode in ("sync", "async"):
            boundary = max(r[mode]["boundary_s"] for r in ranks)
            stall = max(r[mode]["stall_s"] for r in ranks)
            print(
                f"{engine:<8}{optim:<7}{1e3 * step:>9.0f}{size:>9.1f}{mode:>7}{1e3 * boundary:>16.0f}{1e3 * stall:>16.0f}"
            )


if __name__ == "__main__":
    sys.exit(main())
