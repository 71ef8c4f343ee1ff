"""The launchers in launch/: arguments reach the trainer exactly as typed, the project's own environment is found, and
the Slurm job requeues itself after a signalled stop. Slurm and torchrun are stood in for by small scripts."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What users type (README): a list of dicts with quotes and a glob, a value with spaces, a list of overrides.
ARGS = [
    "optim.roles=[{pattern:'attn.*',lr_mult:0.5}]",
    "experiment.name=a name with spaces",
    'train_extra=["data.source=/data/my corpus"]',
    "model=falcon_h1_0p5b",
]


def write_tool(folder: Path, name: str, body: str) -> None:
    (folder / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
    (folder / name).chmod(stat.S_IRWXU)


@pytest.fixture
def cluster(tmp_path):
    """A PATH with srun (runs its command on "the node"), scontrol, and a torchrun that records its arguments."""
    tools = tmp_path / "bin"
    tools.mkdir()
    write_tool(tools, "srun", 'shift; SLURM_NODEID=0 exec "$@"')  # drops --kill-on-bad-exit=1
    write_tool(tools, "scontrol", f'if [ "$1" = show ]; then echo node0; else echo "$@" >> {tmp_path}/scontrol.log; fi')
    recorder = tmp_path / "torchrun.py"
    recorder.write_text(
        "import json, os, sys\n"
        f"open({str(tmp_path / 'argv.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        "sys.exit(int(os.environ.get('EXIT', '0')))\n"
    )
    env = {
        **os.environ,
        "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}",
        "TORCHRUN": f"{sys.executable} {recorder}",
        "SLURM_JOB_NODELIST": "node[0-1]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "77",
        "SLURM_SUBMIT_DIR": str(ROOT),
    }
    return tmp_path, env


def test_slurm_passes_every_argument_intact_to_torchrun(cluster):
    folder, env = cluster
    done = subprocess.run(["bash", "launch/slurm.sbatch", *ARGS], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    argv = json.loads((folder / "argv.json").read_text())
    assert argv[-len(ARGS) - 1 :] == ["dist=ddp", *ARGS]
    assert "--node_rank=0" in argv and "--nnodes=2" in argv and "--rdzv_endpoint=node0:29500" in argv
    assert not (folder / "scontrol.log").exists()


def test_a_slurm_job_stopped_by_its_signal_requeues_itself(cluster):
    folder, env = cluster
    done = subprocess.run(["bash", "launch/slurm.sbatch"], cwd=ROOT, env={**env, "EXIT": "143"}, capture_output=True)
    assert done.returncode == 143
    assert (folder / "scontrol.log").read_text().split() == ["requeue", "77"]
    script = (ROOT / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=TERM@120" in script and "#SBATCH --requeue" in script


@pytest.mark.parametrize("script", ["torchrun_single_node.sh", "torchrun_multi_node.sh"])
def test_torchrun_launchers_pass_arguments_intact(cluster, script):
    folder, env = cluster
    env = {**env, "NPROC": "1", "NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "localhost"}
    done = subprocess.run(["bash", f"launch/{script}", *ARGS], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((folder / "argv.json").read_text())[-len(ARGS) - 1 :] == ["dist=ddp", *ARGS]


def test_the_launchers_use_the_projects_environment_and_its_offline_defaults(tmp_path):
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "TORCHRUN", "DEEPSPEED", "HF_HUB_OFFLINE")}
    show = 'source launch/env.sh; echo "$PYTHON|$TORCHRUN|$HF_HUB_OFFLINE"'
    done = subprocess.run(["bash", "-c", show], cwd=ROOT, env=clean, capture_output=True, text=True)
    python = ROOT / ".venv" / "bin" / "python"
    expected = str(python) if python.exists() else "python3"
    assert done.stdout.strip() == f"{expected}|{expected} -m torch.distributed.run|1"
    done = subprocess.run(["bash", "-c", show], cwd=ROOT, env={**clean, "PYTHON": "/opt/py", "HF_HUB_OFFLINE": "0"},
                          capture_output=True, text=True)  # fmt: skip
    assert done.stdout.strip() == "/opt/py|/opt/py -m torch.distributed.run|0"
