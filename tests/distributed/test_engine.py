"""The engines in one process: the single engine, and DDP joined to a one-rank process group (no launcher needed)."""

import socket

import pytest
import torch
import torch.distributed as dist

from lrm_train.distributed import DDPEngine, DistConfig, Engine, build_engine


@pytest.fixture
def one_rank_launch(monkeypatch):
    """The environment torchrun gives a single rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(port))
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_single_engine_is_one_rank_without_communication():
    engine = build_engine(DistConfig(name="single", device="cpu"))
    assert (engine.rank, engine.world_size, engine.is_main) == (0, 1, True)
    assert engine.all_gather_object({"a": 1}) == [{"a": 1}]
    tensor = torch.tensor([2.0])
    assert engine.all_reduce_mean(tensor) is tensor


def test_ddp_engine_joins_the_launched_group_through_its_own_constructor(one_rank_launch):
    engine = build_engine(DistConfig(name="ddp", device="cpu"))
    assert isinstance(engine, DDPEngine) and dist.is_initialized()
    assert (engine.rank, engine.world_size, engine.device.type) == (0, 1, "cpu")
    assert engine.all_gather_object("x") == ["x"]
    torch.testing.assert_close(engine.all_reduce_mean(torch.tensor([3.0])), torch.tensor([3.0]))
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert engine.setup(model, optimizer, {}) is optimizer
    assert isinstance(engine.model, torch.nn.parallel.DistributedDataParallel) and engine.module is model
    engine.barrier()
    engine.close()
    assert not dist.is_initialized()


def test_zero_engine_is_composed_not_a_ddp_engine():
    from lrm_train.distributed.zero import ZeroEngine

    assert issubclass(ZeroEngine, Engine) and not issubclass(ZeroEngine, DDPEngine)


def test_an_engine_that_needs_a_launcher_says_so(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="dist=ddp needs a launcher"):
        DDPEngine(DistConfig(name="ddp"))
