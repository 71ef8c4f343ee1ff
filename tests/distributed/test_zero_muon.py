"""The ZeRO client's Muon on 2 gloo ranks, without DeepSpeed: shards cut as ZeRO-1/2 (one flat group) and ZeRO-3
(each matrix on its own) cut them, against the single-process optimizer, with the Newton-Schulz work shared."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from runs import count_newton_schulz_calls, exit_saved_worker

from lrm_train.distributed.zero import ShardedAdamWMuon, ShardLayout
from lrm_train.optim import Muon

pytestmark = pytest.mark.multiprocess

# Shapes shared by several matrices (their chunks), a lone one, and a flat group whose shard boundary cuts a matrix.
SHAPES = [(8, 12), (12, 8), (8, 12), (6, 6), (8, 12)]
HYPER = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=True, ns_steps=5, eps=1e-7)


def layout_for(contiguous: bool, world: int, rank: int) -> tuple[ShardLayout, int]:
    """The layout of this rank's shard and the shard's length."""
    shapes = [torch.Size(s) for s in SHAPES]
    if contiguous:
        return ShardLayout([], shapes, [], True, world, rank), math.ceil(sum(s.numel() for s in shapes) / world)
    sizes = [math.ceil(s.numel() / world) for s in shapes]
    return ShardLayout([], shapes, sizes, False, world, rank), sum(sizes)


def _worker(rank, world, folder, weights, grads, contiguous):
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    calls = count_newton_schulz_calls()
    layout, length = layout_for(contiguous, world, rank)
    shard = torch.nn.Parameter(layout.shard(weights, torch.empty(length)))
    group = {"params": [shard], **HYPER, "ns_dtype": "float32", "adjust_lr": "match_rms_adamw"}
    client = ShardedAdamWMuon([{**group, "use_muon": True, "grad_scale": None}])
    client.layouts = {id(shard): layout}
    for step_grads in grads:
        shard.grad = layout.shard(step_grads, shard)
        client.apply = torch.tensor(True)
        client.step()
    applied = layout.gather(shard.detach())
    # A step with NaN gradients that the engine refused changes nothing.
    shard.grad = torch.full_like(shard, float("nan"))
    client.apply = torch.tensor(False)
    momentum = client.state[shard]["momentum_buffer"].clone()
    client.step()
    unchanged = torch.equal(shard.detach(), layout.shard(applied, shard)) and torch.equal(
        client.state[shard]["momentum_buffer"], momentum
    )
    torch.save((applied, len(calls), unchanged), f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()
    exit_saved_worker()


@pytest.mark.parametrize("contiguous", [True, False], ids=["zero12", "zero3"])
def test_sharded_muon_matches_one_process_and_shares_newton_schulz(tmp_path, contiguous):
    weights = [torch.randn(s) for s in SHAPES]
    grads = [[torch.randn(s) for s in SHAPES] for _ in range(3)]
    single = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = Muon(single, **HYPER, ns_dtype="float32", share_across_ranks=False)
    for step_grads in grads:
        for p, g in zip(single, step_grads):
            p.grad = g.clone()
        opt.step()
    mp.start_processes(_worker, args=(2, str(tmp_path), weights, grads, contiguous), nprocs=2, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for applied, _, unchanged in results:
        assert unchanged
        for got, expected in zip(applied, single):
            # The shape's LR factor multiplies the update before the step here, the step size in optim.Muon.
            torch.testing.assert_close(got, expected.detach(), rtol=1e-6, atol=1e-7)
    # 4 steps (the skipped one too); chunks per step: (8, 12) x 3 -> two, (12, 8) and (6, 6) -> one each. Rank r takes
    # the r-th matrix of each chunk: 4 for rank 0, 1 for rank 1 - each matrix once, never all on every rank.
    assert sorted(calls for _, calls, _ in results) == [1 * 4, 4 * 4]
