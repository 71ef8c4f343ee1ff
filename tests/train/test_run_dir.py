import os
import signal
import subprocess
import sys

import pytest
from runs import run_config

from lrm_train.train import open_trainer, run_dir, train
from lrm_train.train.checkpoint import checkpoint_root


def test_a_second_trainer_on_the_same_run_dir_is_refused(data_root, tmp_path):
    cfg = run_config(data_root, tmp_path, **{"train.max_steps": 2})
    with (
        open_trainer(cfg),
        pytest.raises(
            ValueError, match=rf"train.run_dir={tmp_path} is in use by another trainer \(pid {os.getpid()} on "
        ),
    ):
        train(cfg)
    assert train(cfg).step == 2  # released when the first one closed


_HOLD_LOCK = (
    "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
    "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"
)


def test_the_lock_of_a_killed_trainer_is_not_stale(data_root, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(tmp_path / "run.lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    cfg = run_config(data_root, tmp_path, **{"train.max_steps": 2})
    with pytest.raises(ValueError, match="in use by another trainer"):
        train(cfg)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert train(cfg).step == 2


def test_a_run_dir_that_is_a_file_or_unwritable_is_one_line(data_root, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match=rf"train.run_dir={tmp_path / 'file'}: cannot use it as a run directory"):
        train(run_config(data_root, tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "mine"

    def read_only(*args, **kwargs):  # root ignores permission bits, so the refusal is simulated
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_dir, "open", read_only, raising=False)
    with pytest.raises(ValueError, match=r"cannot use it as a run directory \(Permission denied\)"):
        train(run_config(data_root, tmp_path / "ro"))


def test_temporaries_of_interrupted_saves_are_removed_at_start(data_root, tmp_path):
    host = os.uname().nodename
    train(run_config(data_root, tmp_path, **{"train.max_steps": 2, "train.ckpt_every": 2}))  # a run to resume
    dead = checkpoint_root(tmp_path) / f".tmp-step_00000004@{host}-999999999-0123abcd"
    live = checkpoint_root(tmp_path) / f".tmp-step_00000004@{host}-{os.getpid()}-0123abcd"
    for folder in (dead, live):
        folder.mkdir(parents=True)
    train(run_config(data_root, tmp_path, **{"train.max_steps": 3}))
    assert not dead.exists() and live.exists()
