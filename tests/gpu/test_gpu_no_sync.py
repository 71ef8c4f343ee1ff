"""On CUDA, an optimizer step - clipping, finiteness, AdamW's foreach path, Muon - never waits for the device."""

import pytest
import torch
from cuda_runs import GPU

from lrm_train.distributed import DistConfig, build_engine
from lrm_train.models import FalconH1LM, preset
from lrm_train.nn import LRMConfig
from lrm_train.optim import OptimConfig, build_optimizer, classify_parameters

pytestmark = GPU


@pytest.mark.parametrize("optim", ["adamw", "muon"])
@pytest.mark.parametrize("finite", [True, False])
def test_an_optimizer_step_makes_no_host_sync(optim, finite):
    model = FalconH1LM(preset("tiny"), LRMConfig("full")).cuda()
    classes = classify_parameters(model)
    engine = build_engine(DistConfig(name="single", device="cuda"))
    optimizer = engine.setup(
        model, build_optimizer(model, classes, OptimConfig(name=optim), LRMConfig("full")), classes
    )
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
