"""FSDP2 on 2 gloo ranks against the single-process trainer; resume across engines and world sizes."""

import json

import pytest
from runs import as_args, cli, losses, overrides, run_config

from lrm_train.distributed.fsdp import rows_of_rank
from lrm_train.train import train

# As test_zero.py: clipping is active and the learning rate moves the loss; 2 ranks x 2 sequences = 1 process x 2 x 2.
SETTINGS = {
    "optim.lr": 0.02,
    "train.grad_clip": 0.02,
    "train.max_steps": 10,
    "train.micro_batch_size": 2,
    "train.ckpt_every": 5,
}
ONE_PROCESS = {**SETTINGS, "train.grad_accum": 2}
TWO_RANKS = {**SETTINGS, "train.grad_accum": 1, "dist.name": "fsdp"}


def fsdp(data_root, run_dir, **extra):
    done = cli(as_args(overrides(data_root, run_dir, **{**TWO_RANKS, **extra})), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return losses(run_dir)


def single(data_root, run_dir, **extra):
    return losses(train(run_config(data_root, run_dir, **{**ONE_PROCESS, **extra})).run_dir)


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    dirs = {
        name: train(run_config(data_root, root / name, **ONE_PROCESS, **{"optim.name": name})).run_dir
        for name in ("adamw", "muon")
    }
    return {"dir": dirs, **{name: losses(run_dir) for name, run_dir in dirs.items()}}


def assert_same_trajectory(got, expected):
    assert sorted(got) == sorted(expected) == list(range(1, 11))
    for step, loss in expected.items():
        assert abs(got[step] - loss) / abs(loss) < 1e-5, step


def test_rows_of_rank_splits_as_torch_chunk():
    import torch

    for rows in range(1, 9):
        for world in range(1, 5):
            chunks = list(torch.arange(rows).chunk(world))
            for rank in range(world):
                expected = chunks[rank].tolist() if rank < len(chunks) else []
                assert list(range(rows))[rows_of_rank(rows, rank, world)] == expected, (rows, rank, world)


@pytest.mark.multiprocess
@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_fsdp_matches_the_single_process_trainer(data_root, tmp_path, reference, optim):
    got = fsdp(data_root, tmp_path, **{"optim.name": optim})
    assert_same_trajectory(got, reference[optim])
    table = (tmp_path / "train_rank0.log").read_text()
    rows = {
        line.split()[0]: line.split()
        for line in table.splitlines()
        if line.split() and line.split()[0] in ("matrix", "multiplier", "embedding", "norm")
    }
    assert rows["matrix"][3] == ("muon" if optim == "muon" else "adamw")
    assert rows["multiplier"][3] == "adamw" and rows["multiplier"][5] == "0.002"
    assert rows["norm"][5] == "0"
    # The trajectories are taken from whole parameters, and the clipping norm from the shards equals the whole one.
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    expected = json.loads((reference["dir"][optim] / "metrics.jsonl").read_text().splitlines()[-1])
    for key in (
        "grad_norm",
        "norm/layers.0.self_attn.q_proj",
        "lrm/layers.1.mamba.out_proj.lrm_row/max",
        "abm/matrix@hidden/32x32",
    ):
        assert last[key] == pytest.approx(expected[key], rel=1e-5), key
