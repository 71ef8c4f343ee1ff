"""The day a GPU is lent: everything only a GPU can tell, in one command and one results file.

    python scripts/gpu_check.py                     # or: make gpu-check
    python scripts/gpu_check.py --out docs/results/gpu_check --bench-args "--steps 20"
    python scripts/gpu_check.py --suite-timeout 240 --bench-args "--variant-timeout 150"   # a time-limited lease

1. The environment: the device, torch, triton and CUDA versions, and what Triton needs to build its kernels' launcher
   on first use (a C compiler and Python's headers; without them every Triton kernel fails at its first call).
2. The GPU suite (``pytest -m gpu tests/gpu``, as ``make test-gpu``, over ``--suite-workers`` xdist workers sharing
   the GPU: its tests are micro runs, each mostly process start-up): its summary line and the failed tests; its whole
   output in ``OUT/suite.log``. ``--suite-timeout`` ends it (and its workers) where a lease is short.
3. ``scripts/bench_gpu.py`` at its default size, which fits: micro-batch 8, halved while the reference variant runs
   out of memory, down to 1.
4. ``OUT/report.json`` (every figure) and ``OUT/report.md`` (the same as tables), which the README links.

Without CUDA it runs a reduced form (the GPU suite reported as not run, the benchmark on the tiny preset with two
variants, uncompiled, and one step) so that the script is exercised by the CPU suite and cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

from lrm_train.utils import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent


def environment() -> dict:
    import triton

    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    compiler = next((shutil.which(name) for name in ("cc", "gcc", "clang") if shutil.which(name)), None)
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "c_compiler": compiler,
        "python_headers": str(headers) if headers.is_file() else None,
        "triton_can_build": compiler is not None and headers.is_file(),
    }


def gpu_suite(workers: int, timeout: float | None, extra: list[str], log: Path) -> dict:
    if not torch.cuda.is_available():
        return {"ran": False, "why": "no CUDA device"}
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider"]
    command += ["-n", str(workers)] if workers > 1 else []
    # Its own session, so that a timeout ends the xdist workers too and none runs on beside the benchmark.
    suite = subprocess.Popen(
        command + extra, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = suite.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(suite.pid, signal.SIGKILL)
        output, _ = suite.communicate()
        timed_out = True
    atomic_write_text(log, output)
    lines = output.strip().splitlines()
    return {
        "ran": True,
        "exit_code": suite.returncode,
        "timed_out_after_s": timeout if timed_out else None,
        "summary": f"ended after {timeout:g} s, before its summary" if timed_out else (lines or ["(no output)"])[-1],
        "failed": [line.split(" ", 1)[1] for line in lines if line.startswith(("FAILED ", "ERROR "))],
    }


def benchmark(bench_args: list[str], quick: bool) -> dict:
    """bench_gpu.py's figures (at its default size: the largest micro-batch of 8, 4, 2, 1 that fits in memory)."""
    if quick:
        bench_args = ["--variants", "base,lrm=none", "--steps", "1", "--warmup", "0", "--seq-len", "64", "--eager",
                      *bench_args]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), *bench_args, "--json", f"{tmp}/bench.json"]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": (done.stderr.strip().splitlines() or ["(no output)"])[-1]}
        return json.loads(Path(f"{tmp}/bench.json").read_text())


def markdown(results: dict) -> str:
    env, suite, bench = results["environment"], results["gpu_suite"], results["benchmark"]
    lines = ["# GPU check", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in env.items()]
    lines += ["", "## GPU suite (`make test-gpu`)", ""]
    if suite["ran"]:
        lines.append(f"`{suite['summary']}` (exit {suite['exit_code']})")
        lines += [f"- failed: `{name}`" for name in suite["failed"]]
    else:
        lines.append(f"not run: {suite['why']}")
    lines += ["", "## Benchmark (`scripts/bench_gpu.py`)", ""]
    if "error" in bench:
        lines.append(f"failed: {bench['error']}")
        return "\n".join(lines) + "\n"
    lines.append(
        f"{bench['preset']}, micro-batch {bench['micro_batch']} x {bench['seq_len']} tokens, median of {bench['steps']} "
        f"steps after {bench['warmup']}; bf16 peak {bench['peak_tflops'] or 'unknown'} TFLOP/s"
    )
    lines += ["", "| variant | step ms | tokens/s | MFU | peak GiB |", "|---|---|---|---|---|"]
    for name, r in bench["variants"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | |")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        lines.append(f"| {name} | {1e3 * r['seconds']:.1f} | {r['tokens_per_s']:.0f} | {mfu} | {r['peak_gb']:.2f} |")
    lines += ["", "| ratio of step times | value | target | met |", "|---|---|---|---|"]
    for r in bench["ratios"]:
        target = "" if r["target_at_most"] is None else f"<= {r['target_at_most']:.2f}x"
        lines.append(f"| {r['what']} | {r['ratio']:.3f}x | {target} | {'' if r['met'] is None else r['met']} |")
    mfu = bench["mfu_target"]
    if mfu["base"] is not None:
        lines.append(f"| MFU of base (lrm=full) | {mfu['base']:.1%} | >= 40% | {mfu['met']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results/gpu_check", help="where report.json and report.md go")
    parser.add_argument("--bench-args", default="", help="extra arguments for bench_gpu.py, as one string")
    parser.add_argument(
        "--suite-workers", type=int, default=min(8, os.cpu_count() or 1), help="xdist workers for the GPU suite"
    )
    parser.add_argument("--suite-timeout", type=float, default=None, help="seconds before the GPU suite is ended")
    parser.add_argument("--suite-args", default="", help="extra pytest arguments, as one string (e.g. --timeout 120)")
    args = parser.parse_args(argv)
    quick = not torch.cuda.is_available()
    out = Path(args.out)
    suite = gpu_suite(args.suite_workers, args.suite_timeout, shlex.split(args.suite_args), out / "suite.log")
    results = {
        "environment": environment(),
        "gpu_suite": suite,
        "benchmark": benchmark(shlex.split(args.bench_args), quick),
        "reduced_form": quick,
    }
    atomic_write_text(out / "report.json", json.dumps(results, indent=2))
    atomic_write_text(out / "report.md", markdown(results))
    print(markdown(results))
    print(f"wrote {out / 'report.md'} and {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
