"""DeepSpeed ZeRO trains without compiling anything: no C++/CUDA extension is built, or even attempted, at run time.

Every process of a run gets ``jit_guard/sitecustomize.py``, which logs and refuses any extension build, and an empty
``TORCH_EXTENSIONS_DIR``: a run passes only if the log was never written and the folder is still empty. The first test
shows the guard catching both ways a build starts (torch's own and DeepSpeed's op builder), so a silent guard cannot
make the others pass.
"""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from runs import as_args, cli, losses, overrides

pytestmark = pytest.mark.multiprocess

GUARD = Path(__file__).parent / "jit_guard"

TORCH_BUILD = "from torch.utils.cpp_extension import load_inline; load_inline(name='probe', cpp_sources='')"
# The op DeepSpeed builds at every CPU init_distributed unless told not to (the engine tells it).
DEEPSPEED_BUILD = (
    "from deepspeed.accelerator import get_accelerator; "
    "get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
)


@pytest.fixture
def guarded(tmp_path):
    """The environment of a guarded process: builds logged and refused, an empty extension cache."""
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    attempts = tmp_path / "jit_attempts.log"
    python_path = os.pathsep.join(filter(None, [str(GUARD), os.environ.get("PYTHONPATH")]))
    env = {"TORCH_EXTENSIONS_DIR": str(extensions), "LRM_JIT_ATTEMPTS": str(attempts), "PYTHONPATH": python_path}
    return types.SimpleNamespace(env=env, attempts=attempts, extensions=extensions)


def test_the_guard_catches_torch_and_deepspeed_build_attempts(guarded):
    for code in (TORCH_BUILD, DEEPSPEED_BUILD):
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **guarded.env}
        )
        assert done.returncode != 0 and "refused by the no-JIT test" in done.stderr, done.stderr[-2000:]
    logged = guarded.attempts.read_text().splitlines()
    assert len(logged) == 2
    assert logged[0].startswith("load_inline probe") and logged[1].startswith("verify_ninja_availability")
    assert not any(guarded.extensions.iterdir())


@pytest.mark.parametrize("stage", ["zero2", "zero3"])  # ZeRO-1 runs the same code as ZeRO-2
def test_zero_builds_no_extension(data_root, tmp_path, guarded, stage):
    values = overrides(
        data_root,
        tmp_path / "run",
        **{
            "dist.name": stage,
            "optim.name": "muon",
            "train.max_steps": 2,
            "train.ckpt_every": 2,
            "train.eval_every": 2,
        },
    )
    done = cli(as_args(values), nproc=2, env=guarded.env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(losses(tmp_path / "run")) == [1, 2]  # the run trained, evaluated and saved
    assert not guarded.attempts.exists(), guarded.attempts.read_text()
    assert not any(guarded.extensions.iterdir()), sorted(guarded.extensions.rglob("*"))
