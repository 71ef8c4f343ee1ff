import shutil

import pytest
from faults import write_foreign_tokenizer
from runs import as_args, overrides

from lrm_train.train.__main__ import main as train_main


@pytest.fixture(scope="module")
def reference_run(data_root, tmp_path_factory):
    """A finished micro run with checkpoints at steps 2 and 4; cases work on copies of it (``copy_of``)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert train_main(as_args(overrides(data_root, run_dir, **{"train.max_steps": 4, "train.ckpt_every": 2}))) == 0
    return run_dir


@pytest.fixture
def copy_of(reference_run, tmp_path):
    def copy(name: str = "run"):
        return shutil.copytree(reference_run, tmp_path / name)

    return copy


@pytest.fixture(scope="module")
def foreign_tokenizer(tmp_path_factory):
    return write_foreign_tokenizer(tmp_path_factory.mktemp("foreign") / "tokenizer.json")
