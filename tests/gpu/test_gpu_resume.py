"""Exact resume on CUDA: 8 steps in one run equal 4 steps, a stop, and 4 resumed steps, bit for bit (bf16 autocast).

Checkpoints are written and read on the CPU; a resumed run must put the optimizer state back on each parameter's
device (AdamW's foreach update and Muon's ``lerp_`` need them together) and restore the CUDA random state.
"""

import pytest
from cuda_runs import GPU, exact_part, train_on_gpu

pytestmark = GPU

RUN = {"train.max_steps": 8, "train.ckpt_every": 4, "train.eval_every": 4}


def test_bf16_training_on_cuda_is_deterministic(data_root, tmp_path):
    """The control for the resume tests: two identical runs agree bit for bit, so a difference there is the resume's."""
    first = train_on_gpu(data_root, tmp_path / "first", **RUN, **{"optim.name": "muon"})
    again = train_on_gpu(data_root, tmp_path / "again", **RUN, **{"optim.name": "muon"})
    assert [exact_part(again[s]) for s in sorted(again)] == [exact_part(first[s]) for s in sorted(first)]


@pytest.mark.parametrize("engine,optim", [("single", "adamw"), ("single", "muon"), ("ddp", "muon")])
def test_resume_on_cuda_is_bitwise_exact(data_root, tmp_path, engine, optim):
    nproc = 1 if engine == "ddp" else 0  # DDP under torchrun, on the one GPU
    run = {**RUN, "dist.name": engine, "optim.name": optim}
    whole = train_on_gpu(data_root, tmp_path / "whole", nproc, **run)
    stopped = train_on_gpu(data_root, tmp_path / "split", nproc, **run, **{"train.stop_at_step": 4})
    assert sorted(stopped) == [1, 2, 3, 4]
    resumed = train_on_gpu(data_root, tmp_path / "split", nproc, **run)
    assert sorted(resumed) == sorted(whole) == list(range(1, 9))
    for step in whole:
        assert exact_part(resumed[step]) == exact_part(whole[step]), step
    assert "val_loss" in resumed[8] and resumed[8]["val_loss"] == whole[8]["val_loss"]
