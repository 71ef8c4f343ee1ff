import pytest
import torch.distributed as dist
from runs import free_port


@pytest.fixture
def one_rank_launch(monkeypatch):
    """The environment torchrun gives a single rank."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
