import os

# Tests never reach a model/data hub and never sync to W&B.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import importlib
import re

import pytest
import torch


def pytest_configure(config):
    # The CPU suite hides any GPU from itself and its subprocesses (before CUDA is first asked about), so it is the same
    # suite on a GPU machine; `make test-gpu` (-m gpu) selects the GPU suite and leaves the devices alone.
    if not re.search(r"(?<!not )\bgpu\b", config.getoption("markexpr") or ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # Without a GPU, Triton code runs in its interpreter (tests/models/test_ssd_triton.py). The switch is read when
    # triton itself is first imported - by any test's imports (DeepSpeed, torch.compile), not only ours - so it is set
    # here, before collection imports any of them; on a CUDA machine the kernels run compiled.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreted(module_name: str):
    """A module of Triton kernels, checked to run in the interpreter here (on CUDA, tests/gpu runs them compiled)."""
    module = importlib.import_module(module_name)
    if not module.INTERPRETED:
        if torch.cuda.is_available():
            pytest.skip("interpreter tests; on CUDA, tests/gpu runs the compiled kernels")
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it)")
    return module


@pytest.fixture(scope="module")
def ssd_triton():
    return interpreted("lrm_train.models.ssd_triton")


@pytest.fixture
def cross_entropy_triton():
    return interpreted("lrm_train.nn.cross_entropy_triton")


# The fixtures that hand a test a Triton kernel module, interpreted in this suite (it hides any GPU).
INTERPRETER_FIXTURES = {"ssd_triton", "cross_entropy_triton"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
    # By fixture rather than by file: the tests of those files that run no kernel stay in `make test-fast`.
    for item in items:
        if INTERPRETER_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.interpreter)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """One prepared copy of the default corpus (small vocabulary) for every trainer test."""
    return str(tmp_path_factory.mktemp("data"))
