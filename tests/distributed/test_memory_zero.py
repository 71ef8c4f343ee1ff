"""The memory estimate's ZeRO rows against what DeepSpeed really holds on 2 gloo ranks after a step: the weights
(the model's parameters or their shards, and the float32 master shards, each storage once), the optimizer state on
the shards, and the reduce bucket."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from runs import exit_saved_worker, free_port

from lrm_train.distributed.zero import ZeroEngine
from lrm_train.models import FalconH1LM
from lrm_train.optim import build_optimizer, classify_parameters
from lrm_train.train.config import compose
from lrm_train.train.memory import REDUCE_BUCKET_ELEMENTS, estimate, gathered_units

pytestmark = pytest.mark.multiprocess

WORLD = 2


def storage_bytes(tensors) -> int:
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _worker(rank, port, overrides, folder):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    cfg = compose(overrides)
    engine = ZeroEngine(cfg.dist)
    model = FalconH1LM(cfg.model, cfg.lrm)
    classes = classify_parameters(model)
    client = engine.setup(model, build_optimizer(model, classes, cfg.optim), classes)
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len))
    # ZeRO-1/2 allocate the bucket as each backward starts and free it when it ends: part of the backward's peak.
    opt, allocated = engine.ds_optimizer, {}
    allocate = getattr(opt, "setup_buckets", None)

    def recording_setup():  # called at every gradient hook; it allocates at the first
        allocate()
        for bucket in opt.ipg_buckets.values():
            allocated.update({t.untyped_storage()._cdata: t.numel() for t in _buffers(bucket)})

    if allocate is not None:
        opt.setup_buckets = recording_setup
    engine.backward(engine.model(ids, ids, 0.0).loss)
    buckets = list(allocated.values())
    if allocate is None:  # ZeRO-3 allocates it once, when it starts
        buckets = [t.numel() for bucket in opt.ipg_buckets.values() for t in _buffers(bucket)]
    engine.optimizer_step(0.0, torch.tensor(True))
    params = [p.ds_tensor if engine.stage == 3 else p.data for p in model.parameters()]
    weights = storage_bytes([*params, *(shard for _, shard, _ in engine.shards())])
    optimizer = sum(t.numel() * t.element_size() for state in client.state.values() for t in state.values())
    torch.save((weights, optimizer, buckets), f"{folder}/rank{rank}.pt")
    engine.close()
    exit_saved_worker()


def _buffers(bucket) -> list[torch.Tensor]:
    return bucket.buffer if isinstance(bucket.buffer, list) else [bucket.buffer]


@pytest.mark.parametrize(
    "overrides",
    [["dist=zero1"], ["dist=zero3", "dist.zero3_persistence_threshold=0"], ["dist=zero2", "optim=muon"]],
    ids=["zero1", "zero3", "zero2-muon"],
)
def test_zero_weights_optimizer_state_and_reduce_bucket_are_what_deepspeed_holds(tmp_path, overrides):
    overrides = [*overrides, "train.micro_batch_size=1", "data.seq_len=64"]
    mp.spawn(_worker, args=(free_port(), overrides, str(tmp_path)), nprocs=WORLD)
    cfg = compose(overrides)
    row = next(r for r in estimate(cfg, [WORLD]) if r.engine == cfg.dist.name)
    gathered = max(gathered_units(FalconH1LM(cfg.model, cfg.lrm))) * 4 if cfg.dist.name == "zero3" else 0
    for rank in range(WORLD):
        weights, optimizer, buckets = torch.load(tmp_path / f"rank{rank}.pt")
        # Shards are padded to whole multiples of the world size (and aligned): a few elements more than 1/world.
        assert row.weights - gathered == pytest.approx(weights, rel=1e-3)
        assert row.optimizer == pytest.approx(optimizer, rel=1e-3)
        assert buckets == [REDUCE_BUCKET_ELEMENTS]
