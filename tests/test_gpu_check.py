"""scripts/gpu_check.py in its reduced CPU form: the environment, the GPU suite reported as not run, the benchmark's
figures, and a report that says the same as its JSON (so the command the GPU day depends on cannot rot)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.multiprocess
def test_the_gpu_check_writes_every_figure_on_cpu(tmp_path):
    # Its own data root: the benchmark prepares the corpus at the tiny preset's vocabulary, which the trainer tests'
    # shared data_root must not hold (they pick its one prepared folder).
    bench_args = f"--data-root {tmp_path / 'data'} --preset tiny"
    done = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path / "out"), "--bench-args", bench_args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "report.json").read_text())
    env = results["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["triton"] and results["reduced_form"] is True
    assert env["triton_can_build"] == (env["c_compiler"] is not None and env["python_headers"] is not None)
    assert results["gpu_suite"] == {"ran": False, "why": "no CUDA device"}
    bench = results["benchmark"]
    base, plain = bench["variants"]["base"], bench["variants"]["lrm=none"]
    assert base["seconds"] > 0 and base["tokens_per_s"] == bench["micro_batch"] * bench["seq_len"] / base["seconds"]
    [overhead] = [r for r in bench["ratios"] if r["what"].startswith("LRM overhead")]
    assert overhead["ratio"] == base["seconds"] / plain["seconds"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert (
        "not run: no CUDA device" in report
        and f"| LRM overhead (lrm=full / lrm=none) | {overhead['ratio']:.3f}x" in report
    )


def test_the_benchmark_halves_the_micro_batch_until_the_first_variant_fits(monkeypatch):
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "scripts" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tried = []

    def fits_from_two(args, variant):
        tried.append((variant, args.micro_batch))
        if args.micro_batch > 2:
            return {"error": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}
        return {"seconds": 1.0}

    monkeypatch.setattr(bench, "run_variant_in_subprocess", fits_from_two)
    args = argparse.Namespace(micro_batch=0)
    assert bench.measure_at_a_size_that_fits(args, ["base", "eager"]) == {
        "base": {"seconds": 1.0},
        "eager": {"seconds": 1.0},
    }
    assert args.micro_batch == 2 and tried == [("base", 8), ("base", 4), ("base", 2), ("eager", 2)]
    tried.clear()
    args = argparse.Namespace(micro_batch=4)  # a size given is kept, out of memory or not
    assert "error" in bench.measure_at_a_size_that_fits(args, ["base"])["base"] and tried == [("base", 4)]
