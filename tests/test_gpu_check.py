"""scripts/gpu_check.py in its reduced CPU form: the environment, the GPU suite reported as not run, the benchmark's
figures, and a report that says the same as its JSON (so the command the GPU day depends on cannot rot)."""

import argparse
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
    bench = load_script("bench_gpu")
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


def load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def process_is_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"  # killed, not yet reaped by whoever adopted it


@pytest.mark.multiprocess
def test_a_suite_past_its_timeout_is_ended_with_the_processes_it_started(tmp_path, monkeypatch):
    gpu_check = load_script("gpu_check")
    (tmp_path / "tests" / "gpu").mkdir(parents=True)
    # As the GPU tests do, it runs a process of its own (the trainer under torchrun), which must end with the suite.
    (tmp_path / "tests" / "gpu" / "test_slow.py").write_text(
        "import subprocess, pytest\n\n\n@pytest.mark.gpu\ndef test_slow():\n"
        "    run = subprocess.Popen(['sleep', '300'])\n"
        f"    open({str(tmp_path / 'pid')!r}, 'w').write(str(run.pid))\n    run.wait()\n"
    )
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    result = gpu_check.gpu_suite(2, 15, [], tmp_path / "out" / "suite.log")
    assert result["timed_out_after_s"] == 15 and result["summary"] == "ended after 15 s, before its summary"
    assert (tmp_path / "out" / "suite.log").is_file()
    assert process_is_gone(int((tmp_path / "pid").read_text()))


def test_a_variant_past_its_timeout_is_given_up(monkeypatch):
    bench = load_script("bench_gpu")
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py"])
    args = argparse.Namespace(micro_batch=1, variant_timeout=0.5)
    assert bench.run_variant_in_subprocess(args, "base") == {"error": "timed out after 0.5 s (--variant-timeout)"}
