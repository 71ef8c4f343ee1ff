"""launch/prepare_array.sbatch: the shared tokenizer, then an array of parts, then the merge after them all, each with
the user's data settings intact. sbatch is stood in for by a script that runs each job at once, in order."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data.conftest import write_corpus

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "prepare_array.sbatch"

# Runs "sbatch [--parsable] [--array=A-B] [--dependency=...] [--export=ALL,K=V,...] SCRIPT ARGS..." at once: every
# array task in turn, with its SLURM_ARRAY_TASK_ID; records each call; prints a job id.
FAKE_SBATCH = """
import json, os, subprocess, sys
args, env, tasks = sys.argv[1:], dict(os.environ), [None]
options = [a for a in args if a.startswith("--")]
script, *rest = [a for a in args if not a.startswith("--")]
with open(os.environ["SBATCH_LOG"], "a") as log:
    log.write(json.dumps(options) + "\\n")
for option in options:
    if option.startswith("--export="):
        env.update(kv.split("=", 1) for kv in option.split("=", 1)[1].split(",")[1:])
    if option.startswith("--array="):
        first, last = option.split("=")[1].split("-")
        tasks = range(int(first), int(last) + 1)
for task in tasks:
    if task is not None:
        env["SLURM_ARRAY_TASK_ID"] = str(task)
    subprocess.run(["bash", script, *rest], env=env, check=True, stdout=sys.stderr)
print("4242")
"""


def test_the_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.multiprocess  # seven Python processes: about 15 s
def test_the_array_job_prepares_the_folder_one_process_would(tmp_path):
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "sbatch").write_text(f'#!/usr/bin/env bash\nexec {sys.executable} {tmp_path / "sbatch.py"} "$@"\n')
    (tools / "sbatch").chmod(stat.S_IRWXU)
    (tmp_path / "sbatch.py").write_text(FAKE_SBATCH)
    corpus = write_corpus(tmp_path / "my corpus")  # a space: the arguments must reach prepare intact
    args = [f"data.source={corpus}", f"data.out_root={tmp_path / 'out'}", "data.vocab_size=300", "data.num_proc=1"]
    env = {
        **os.environ,
        "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "NUM_PARTS": "3",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SBATCH_LOG": str(tmp_path / "sbatch.log"),
    }
    done = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in (tmp_path / "sbatch.log").read_text().splitlines()]
    assert calls == [
        ["--parsable", "--array=0-2", "--export=ALL,PREPARE_STAGE=part,NUM_PARTS=3"],
        ["--parsable", "--dependency=afterok:4242", "--export=ALL,PREPARE_STAGE=merge,NUM_PARTS=3"],
    ]
    [merged] = (tmp_path / "out").glob("*-*/manifest.json")
    assert "wrote part 2 of 3" in done.stderr
    single = subprocess.run(
        [sys.executable, "-m", "lrm_train.data.prepare", *args[:1], f"data.out_root={tmp_path / 'one'}", *args[2:]],
        capture_output=True,
        text=True,
    )
    one = Path(single.stdout.strip())
    assert one.name == merged.parent.name
    assert sorted(p.name for p in one.glob("*.bin")) == sorted(p.name for p in merged.parent.glob("*.bin"))
    for shard in one.glob("*.bin"):
        assert (merged.parent / shard.name).read_bytes() == shard.read_bytes()
