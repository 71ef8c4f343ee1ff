"""On CUDA, an optimizer step - clipping, finiteness, AdamW's foreach path, Muon - never waits for the device, and
neither does a whole training step that does not log."""

import math

import pytest
import torch
from cuda_runs import BF16, GPU
from runs import run_config

from lrm_train.distributed import DistConfig, build_engine
from lrm_train.models import FalconH1LM, preset
from lrm_train.nn import LRMConfig
from lrm_train.optim import OptimConfig, build_optimizer, classify_parameters
from lrm_train.train import open_trainer

pytestmark = GPU


@pytest.mark.parametrize("optim", ["adamw", "muon"])
@pytest.mark.parametrize("finite", [True, False])
def test_an_optimizer_step_makes_no_host_sync(optim, finite):
    model = FalconH1LM(preset("tiny"), LRMConfig("full")).cuda()
    classes = classify_parameters(model)
    engine = build_engine(DistConfig(name="single", device="cuda"))
    optimizer = engine.setup(model, build_optimizer(model, classes, OptimConfig(name=optim)), classes)
    for _ in range(2):  # the second step runs with the optimizer state in place
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        if not finite:
            next(model.parameters()).grad[0] = float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _, applied = engine.optimizer_step(1.0, torch.ones((), dtype=torch.bool, device="cuda"))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert bool(applied) == finite
        changed = [not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before)]
        assert all(changed) if finite else not any(changed)
    assert optimizer is engine.optimizer


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_a_training_step_that_does_not_log_makes_no_host_sync(data_root, tmp_path, optim):
    """The whole step on the GPU - pinned batch copied without waiting, forward, loss, backward, optimizer - and the
    callbacks of a step that neither logs, evaluates nor saves."""
    cfg = run_config(
        data_root,
        tmp_path / "run",
        **BF16,
        **{"optim": optim, "train.log_every": 50, "train.eval_every": 50, "train.ckpt_every": 50},
        **{"train.max_steps": 50, "logging.trajectories": False},
    )
    with open_trainer(cfg) as trainer:
        for _ in range(2):  # allocations and lazy state first
            trainer.train_step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step = trainer.train_step()
            for callback in trainer.callbacks:
                callback.on_step(trainer, step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert math.isfinite(float(step.loss))
