"""prepare as a process: interrupted or killed while its tokenizer workers run, it leaves no workers and no output."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

# Runs the prepare CLI with workers that stall on their first batch, so the test can interrupt or kill it mid-way.
STALLED_PREPARE = textwrap.dedent(
    """
    import sys, time
    from lrm_train.data import prepare, tokenizer

    def stall(texts):
        time.sleep(600)

    tokenizer._encode_in_worker = stall
    sys.exit(prepare.main(sys.argv[1:]))
    """
)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; nobody may be left to reap it in a container


def start_stalled_prepare(tmp_path, corpus_dir):
    script = tmp_path / "stalled_prepare.py"
    script.write_text(STALLED_PREPARE)
    # A terminal's job gets Ctrl-C even where pytest was started in the background, which ignores SIGINT: a child
    # inherits an ignored signal but not a handler, so a handler here gives it the default.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    process = subprocess.Popen(
        [
            sys.executable,
            str(script),
            f"data.source={corpus_dir}",
            f"data.out_root={tmp_path / 'out'}",
            "data.vocab_size=300",
            "data.num_proc=2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 60
    while len(workers := children(process.pid)) < 2:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the tokenizer workers never started"
        time.sleep(0.1)
    time.sleep(0.5)  # the workers are inside their first batch
    return process, workers


def assert_gone(workers):
    deadline = time.monotonic() + 5
    while any(running(pid) for pid in workers):
        assert time.monotonic() < deadline, f"orphaned workers: {[pid for pid in workers if running(pid)]}"
        time.sleep(0.1)


@pytest.mark.skipif(sys.platform != "linux", reason="workers die with their parent through Linux's PR_SET_PDEATHSIG")
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_killing_prepare_leaves_no_workers(tmp_path, corpus_dir, signum):
    process, workers = start_stalled_prepare(tmp_path, corpus_dir)
    os.kill(process.pid, signum)
    process.wait(timeout=30)
    assert_gone(workers)
    assert not list((tmp_path / "out").glob("*/manifest.json"))


def test_ctrl_c_exits_130_with_one_line_and_keeps_nothing_half_written(tmp_path, corpus_dir):
    process, workers = start_stalled_prepare(tmp_path, corpus_dir)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"error: interrupted; nothing of this prepare was kept (finished folders in {tmp_path / 'out'} are untouched)"
    )
    assert_gone(workers)
    assert not list((tmp_path / "out").iterdir())
