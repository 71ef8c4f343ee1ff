"""Fault cases of the trainer: configs it cannot run, a run directory reused for a new run, a failing user callback,
and the signals a scheduler sends. Each ends with one line and loses nothing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from harness import assert_refused, run_main, snapshot
from runs import as_args, losses, overrides

from lrm_train.train.__main__ import main as train_main

# Refused while the config is composed: no run directory is created.
CONFIG_CASES = {
    "C01 a typo": (["train.max_stepz=5"], r"unknown config key 'train.max_stepz'"),
    "C02 not a number": (["train.max_steps=abc"], r"train.max_steps: Value 'abc' .* could not be converted"),
    "C03 zero steps": (["train.max_steps=0"], r"train.max_steps=0 must be >= 1"),
    "C05 a negative LR": (["optim.lr=-1"], r"optim.lr=-1.0 must be > 0"),
    "C08 mamba_d_ssm": (["model.mamba_d_ssm=100"], r"model.mamba_d_ssm=100 != mamba_n_heads x mamba_d_head"),
    "C10 no such optimizer": (["optim=sgd"], r"Could not find 'optim/sgd' \(options: adamw, muon\)"),
    "C12 no such engine": (["dist=zero4"], r"Could not find 'dist/zero4'"),
    "C22 betas": (["optim.betas=[2,0.5]"], r"optim.betas\[0\]=2.0 must be in \[0, 1\)"),
    "C25 ddp without a launcher": (["dist=ddp"], r"dist=ddp needs a launcher"),
    "N01 the Triton scan on CPU": (["model.ssd_backend=triton"], r"model.ssd_backend=triton needs a CUDA device"),
    "N03 compile with ZeRO-3": (["train.compile=true", "dist=zero3"], r"train.compile=true does not work with"),
    "N16 keep_last=0": (["train.keep_last=0"], r"train.keep_last=0 must be >= 1"),
    "N23 fp8": (["train.precision=fp8"], r"train.precision: Invalid value 'fp8', expected one of"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_a_config_the_trainer_cannot_run_is_refused_before_the_run_directory_exists(case, tmp_path):
    args, line = CONFIG_CASES[case]
    assert_refused(run_main(train_main, [*args, f"train.run_dir={tmp_path / 'run'}"]), line)
    assert not (tmp_path / "run").exists()


def records(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_starting_over_in_a_used_run_directory_moves_the_old_run_aside_whole(copy_of, data_root, capsys):
    run = copy_of()
    (run / "wandb_id.txt").write_text("oldrunid0001")
    before = snapshot(run)
    new_run = overrides(data_root, run, **{"train.max_steps": 3, "train.ckpt_every": 3, "train.seed": 1})
    assert train_main(as_args({**new_run, "train.resume": "none"})) == 0
    [previous] = list((run / "previous_runs").iterdir())
    assert f"train.run_dir={run} held another run: its files are now in {previous}" in capsys.readouterr().err
    for path, digest in before.items():  # every old file, byte for byte, under the same relative name
        if path.name == "run.lock":  # stays: the new trainer holds it
            continue
        moved = previous / path.relative_to(run)
        assert snapshot(moved)[moved] == digest, moved
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003"]
    assert records(run) == [1, 2, 3] and not (run / "wandb_id.txt").exists()
    # The next plain launch continues this run, not the one moved aside (which got to step 4).
    assert train_main(as_args({**new_run, "train.max_steps": 4})) == 0
    assert f"resumed from {run}/checkpoints/step_00000003" in (run / "train_rank0.log").read_text()
    assert records(run) == [1, 2, 3, 4]


def test_a_run_that_never_checkpointed_is_moved_aside_not_truncated(copy_of, data_root):
    run = copy_of()
    for checkpoint in (run / "checkpoints").iterdir():  # a run that stopped before its first checkpoint
        for name in os.listdir(checkpoint):
            os.remove(checkpoint / name)
        os.rmdir(checkpoint)
    metrics = (run / "metrics.jsonl").read_bytes()
    assert train_main(as_args(overrides(data_root, run, **{"train.max_steps": 2}))) == 0
    [previous] = list((run / "previous_runs").iterdir())
    assert (previous / "metrics.jsonl").read_bytes() == metrics
    assert records(run) == [1, 2]


def test_a_user_callback_that_raises_stops_with_one_line_and_a_checkpoint_at_its_step(data_root, tmp_path):
    base = overrides(data_root, tmp_path / "whole", **{"train.max_steps": 6, "train.ckpt_every": 4})
    assert train_main(as_args(base)) == 0
    boom = {"+callbacks.boom._target_": "faulty_callbacks.Boom", "+callbacks.boom.at": 3}
    split = {**base, "train.run_dir": tmp_path / "split"}
    outcome = run_main(train_main, as_args({**split, **boom}))
    kept = tmp_path / "split" / "checkpoints" / "step_00000003"
    assert_refused(
        outcome,
        rf"^error: callbacks.boom failed at step 3 \(ZeroDivisionError: division by zero\); kept the checkpoint "
        rf"{kept} \(run the same command to resume from it\)$",
    )
    assert records(tmp_path / "split") == [1, 2, 3]  # the step's metrics were written before the save
    assert train_main(as_args(split)) == 0  # the fault fixed (the callback removed): resume from step 3
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")


@pytest.mark.multiprocess
def test_a_callback_failing_on_one_rank_stops_every_rank_at_that_step_with_its_checkpoint(data_root, tmp_path):
    run = overrides(data_root, tmp_path, **{"dist.name": "ddp", "train.max_steps": 8, "train.micro_batch_size": 2})
    boom = {"+callbacks.boom._target_": "faulty_callbacks.Boom", "+callbacks.boom.at": 3, "+callbacks.boom.rank": 1}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(__file__)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "lrm_train.train"]
    done = subprocess.run([*launcher, *as_args({**run, **boom})], capture_output=True, text=True, env=env, timeout=240)
    kept = tmp_path / "checkpoints" / "step_00000003"
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and kept.is_dir()  # both ranks took part in the save: no hang, no lost step
    assert (
        f"error: callbacks.boom failed at step 3 (ZeroDivisionError: division by zero); kept the checkpoint {kept}"
        in ("\n".join(lines))
    )
    assert any(
        line.startswith("error: a callback failed at step 3 on another rank; kept the checkpoint") for line in lines
    ), done.stderr[-6000:]


UNBUILDABLE_CALLBACKS = {
    "N12 a wrong argument": (
        {"+callbacks.boom._target_": "faulty_callbacks.Boom", "+callbacks.boom.nosucharg": 1},
        r"callbacks.boom: cannot build it \(TypeError: .*unexpected keyword argument 'nosucharg'\)$",
    ),
    "N08 no such module": (
        {"+callbacks.x._target_": "nonexistent.Class"},
        r"callbacks.x: cannot build it \(ModuleNotFoundError: No module named 'nonexistent'\)$",
    ),
}


@pytest.mark.parametrize("case", UNBUILDABLE_CALLBACKS)
def test_a_user_callback_that_cannot_be_built_names_the_cause(case, data_root, tmp_path):
    args, line = UNBUILDABLE_CALLBACKS[case]
    assert_refused(run_main(train_main, as_args(overrides(data_root, tmp_path, **args))), line)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_saves_a_checkpoint_at_the_step_boundary_and_exits_for_requeue(signum, data_root, tmp_path):
    base = overrides(data_root, tmp_path / "whole", **{"train.max_steps": 6, "train.ckpt_every": 4})
    assert train_main(as_args(base)) == 0
    split = {**base, "train.run_dir": tmp_path / "split"}
    stop = {"+callbacks.stop._target_": "faulty_callbacks.SignalAt", "+callbacks.stop.at": 3}
    outcome = run_main(train_main, as_args({**split, **stop, "+callbacks.stop.signum": int(signum)}))
    kept = tmp_path / "split" / "checkpoints" / "step_00000003"
    assert outcome.code == 128 + signum and not outcome.escaped
    assert outcome.stderr.splitlines()[-1] == (
        f"stopped: {signum.name} at step 3; saved the checkpoint {kept} (run the same command to resume from it)"
    )
    assert train_main(as_args(split)) == 0
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")


def _wait_for_step(run_dir, step: int, process, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(records(run_dir)) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached: {process.poll()}")


@pytest.mark.multiprocess
def test_sigterm_to_a_two_rank_torchrun_job_saves_on_every_rank_and_resumes_bit_exactly(data_root, tmp_path):
    base = overrides(
        data_root,
        tmp_path / "split",
        **{"dist.name": "ddp", "train.max_steps": 400, "train.ckpt_every": 1000, "train.micro_batch_size": 2},
    )
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "lrm_train.train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([*launcher, *as_args(base)], stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_step(tmp_path / "split", 2, job)
    job.send_signal(signal.SIGTERM)  # what Slurm sends on preemption or scancel; torchrun passes it to both ranks
    _, stderr = job.communicate(timeout=120)
    [kept] = list((tmp_path / "split" / "checkpoints").iterdir())
    stopped_at = int(kept.name.removeprefix("step_"))
    lines = [line for line in stderr.splitlines() if line.startswith("stopped:")]
    assert lines and all(f"SIGTERM at step {stopped_at}; saved the checkpoint {kept}" in line for line in lines)
    assert "Traceback" not in "\n".join(line for line in stderr.splitlines() if "lrm_train" in line)
    # Resume to two steps past the signal, and run the same schedule uninterrupted: the same losses, bit for bit.
    stop = {"train.stop_at_step": stopped_at + 2}
    for run_dir in ("split", "whole"):
        done = subprocess.run([*launcher, *as_args({**base, **stop, "train.run_dir": tmp_path / run_dir})], env=env)
        assert done.returncode == 0
    assert sorted(losses(tmp_path / "split")) == list(range(1, stopped_at + 3))
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
