"""Asynchronous checkpoints under faults: a process killed (SIGKILL) at several moments of a background write keeps
the previous complete checkpoint as the newest valid one, and the resumed run is the uninterrupted one; a SIGTERM
during a background write completes it before the run stops."""

import os
import re
import signal
from pathlib import Path

import pytest
from runs import as_args, cli, losses, overrides

from lrm_train.train.checkpoint import complete_checkpoints, newest_loadable

HERE = Path(__file__).parent
BASE = {"train.max_steps": 8, "train.ckpt_every": 2, "train.async_checkpoint": "true"}


def _env() -> dict:
    return {"PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(HERE)) if p)}


@pytest.fixture(scope="module")
def whole(data_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    done = cli(as_args(overrides(data_root, run_dir, **BASE)))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("moment", ["first_file", "files_written", "manifest_written"])
def test_a_kill_during_a_background_write_keeps_the_previous_checkpoint(data_root, tmp_path, whole, moment):
    run = overrides(data_root, tmp_path, **BASE)
    fault = {"+callbacks.fault._target_": "faulty_callbacks.DuringSave", "+callbacks.fault.at": 4}
    killed = cli(as_args({**run, **fault, "+callbacks.fault.moment": moment}), env=_env())
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = tmp_path / "checkpoints"
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000002"]
    assert any(p.name.startswith(".tmp-step_00000004") for p in checkpoints.iterdir())  # the write it was in
    assert newest_loadable(tmp_path)[0].name == "step_00000002"
    resumed = cli(as_args(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoints / 'step_00000002'} at step 2" in (tmp_path / "train_rank0.log").read_text()
    assert not any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())  # the dead writer's folder is cleared
    assert losses(tmp_path) == losses(whole)
    assert [p.name for p in complete_checkpoints(tmp_path)] == [p.name for p in complete_checkpoints(whole)]


def test_a_sigterm_during_a_background_write_completes_it_and_stops(data_root, tmp_path, whole):
    run = overrides(data_root, tmp_path, **BASE)
    fault = {"+callbacks.fault._target_": "faulty_callbacks.DuringSave", "+callbacks.fault.at": 4}
    stopped = cli(
        as_args({**run, **fault, "+callbacks.fault.moment": "started", "+callbacks.fault.action": "term"}), env=_env()
    )
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    # The signal is seen at the end of step 4 or, if it comes a moment later, of step 5: that step is saved.
    line = stopped.stderr.strip().splitlines()[-1]
    found = re.fullmatch(r"stopped: SIGTERM at step (\d); saved the checkpoint (\S+) \(run the same command .*\)", line)
    assert found and found.group(1) in ("4", "5"), line
    assert complete_checkpoints(tmp_path)[-1] == Path(found.group(2))
    assert "step_00000004" in [p.name for p in complete_checkpoints(tmp_path)]  # the background write completed
    assert cli(as_args(run)).returncode == 0
    assert losses(tmp_path) == losses(whole)
