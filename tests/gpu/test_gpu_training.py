"""bf16 training on the GPU for every multiplier placement and both optimizers: finite, and the loss goes down."""

import math

import pytest
from cuda_runs import GPU, finite_losses, train_on_gpu

pytestmark = GPU

STEPS = 20
# A constant, fairly high learning rate so that 20 steps of the micro model move the loss well past bf16 noise
# (float32 on CPU: about 0.3 nats below the first steps).
FAST = {"schedule": "constant", "optim.lr": 0.03, "train.max_steps": STEPS, "train.eval_every": STEPS}


@pytest.mark.parametrize("optim", ["adamw", "muon"])
@pytest.mark.parametrize("placement", ["none", "scalar", "full", "symmetry_free"])
def test_bf16_training_lowers_the_loss(data_root, tmp_path, placement, optim):
    records = train_on_gpu(data_root, tmp_path, **FAST, **{"lrm.placement": placement, "optim.name": optim})
    assert sorted(records) == list(range(1, STEPS + 1))
    losses = finite_losses(records)
    assert losses[0] == pytest.approx(math.log(512), abs=0.05)  # a fresh model guesses uniformly over the vocabulary
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    last = records[STEPS]
    assert last["skipped_steps"] == 0
    assert math.isfinite(last["val_loss"]) and last["val_loss"] < losses[0] - 0.1
    multipliers = {k: v for k, v in last.items() if k.startswith("lrm/")}  # values, or mean/std/min/max of vectors
    if placement == "none":
        assert not multipliers
    else:  # the learnable multipliers train too
        assert multipliers and all(math.isfinite(v) for v in multipliers.values())
        assert any(abs(v - records[1][k]) > 1e-4 for k, v in multipliers.items())
