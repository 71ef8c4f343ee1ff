"""Trajectory metrics (values, not only keys) and the Adam-Brownian-motion prediction."""

import copy
import math
import types
from dataclasses import replace

import pytest
import torch

from lrm_train.models import FalconH1LM, preset
from lrm_train.nn import LRMConfig
from lrm_train.optim import OptimConfig, build_optimizer, classify_parameters, make_optimizer
from lrm_train.train import metrics
from lrm_train.train.metrics import AdamBrownianMotion, matrix_init_stds, trajectory_metrics


def one_group(shapes: dict, use_muon: bool, lr: float, wd: float, name: str = "matrix"):
    group = {"param_class": "matrix", "name": name, "names": list(shapes), "use_muon": use_muon, "lr": lr,
             "weight_decay": wd}  # fmt: skip
    return types.SimpleNamespace(param_groups=[group])


def mean_square_norm(abm, key: str, steps: int, burn_in: int, reference=None) -> tuple[float, float]:
    """RMS of the ABM's prediction (and of a reference parameter stepped alongside) over the steps after burn-in."""
    ours, theirs = [], []
    for step in range(steps):
        abm.step()
        if reference is not None:
            reference()
        if step >= burn_in:
            ours.append(float(abm.norms()[key]) ** 2)
            if reference is not None:
                theirs.append(float(reference.param.detach().pow(2).mean()))
    return math.sqrt(sum(ours) / len(ours)), math.sqrt(sum(theirs) / len(theirs)) if theirs else 0.0


def test_adamw_shadow_settles_at_the_weight_decay_equilibrium():
    lr, wd, beta1 = 1e-2, 1.0, 0.9
    abm = AdamBrownianMotion(one_group({"w": (32, 32)}, False, lr, wd), OptimConfig(), {"w": (32, 32)}, {"w": 0.02}, 0)
    rms, _ = mean_square_norm(abm, "matrix/32x32", steps=1000, burn_in=300)
    # Adam's update with N(0, 1) gradients is lr times an EMA(beta1) of unit noise; with W *= 1 - lr*wd each step, W is
    # that noise through two first-order filters, whose stationary variance is known in closed form:
    a, b = 1 - lr * wd, beta1
    exact = lr * (1 - b) * math.sqrt((1 + a * b) / ((1 - a * b) * (1 - a * a) * (1 - b * b)))
    assert rms == pytest.approx(exact, rel=0.03)
    assert rms == pytest.approx(math.sqrt(lr / (2 * wd)), rel=0.07)  # its limit for lr*wd << 1 - beta1


@pytest.mark.parametrize("rule,shape", [("match_rms_adamw", (256, 64)), ("original", (64, 256))])
def test_muon_shadow_of_a_scaled_down_shape_predicts_the_full_shape(monkeypatch, rule, shape):
    monkeypatch.setattr(metrics, "ABM_MAX_SIDE", 64)  # simulate 256x64 at 64x16
    cfg, lr, wd = OptimConfig(name="muon", muon_adjust_lr=rule), 0.02, 1.0
    abm = AdamBrownianMotion(one_group({"w": shape}, True, lr, wd), cfg, {"w": shape}, {"w": 0.02}, 0)
    key = f"matrix/{shape[0]}x{shape[1]}"
    assert tuple(abm.shadows[key].param.shape) == (shape[0] // 4, shape[1] // 4)
    generator = torch.Generator().manual_seed(1)
    param = torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.02)
    full = make_optimizer([{"params": [param], "lr": lr, "weight_decay": wd}], True, cfg)

    def reference_step():
        param.grad = torch.randn(shape, generator=generator)
        full.step()

    reference_step.param = param
    ours, theirs = mean_square_norm(abm, key, steps=400, burn_in=150, reference=reference_step)
    assert ours == pytest.approx(theirs, rel=0.1)  # measured: 5.5% at this 4x reduction, for both rules


def test_one_shadow_per_group_and_shape_with_the_runs_optimizer():
    model = FalconH1LM(replace(preset("tiny"), zero_init_readouts=False), LRMConfig("full"))  # a non-zero head
    cfg = OptimConfig(name="muon")
    optimizer = build_optimizer(model, classify_parameters(model), cfg)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    abm = AdamBrownianMotion(optimizer, cfg, shapes, matrix_init_stds(model), seed=1)
    # tiny is a muP transfer: its hidden matrices have a group of their own (their LR is scaled), B and C do not.
    matrix_groups = {
        f"{'matrix' if m.role in ('ssm.B', 'ssm.C') else 'matrix@hidden'}/{m.weight.shape[0]}x{m.weight.shape[1]}"
        for n, m in model.matrices().items()
        if n not in ("embed_tokens", "lm_head")
    }
    assert set(abm.shadows) == matrix_groups | {"embedding/8192x128", "lm_head/8192x128"}
    assert "matrix/16x128" in matrix_groups  # B and C: d_state x width
    assert type(abm.shadows["matrix@hidden/128x128"].optimizer).__name__ == "Muon"
    assert type(abm.shadows["embedding/8192x128"].optimizer).__name__ == "AdamW"
    assert tuple(abm.shadows["embedding/8192x128"].param.shape) == (128, 2)  # capped: AdamW is elementwise
    # Resume: the state dict brings the generator, the shadows and their optimizers back exactly.
    for _ in range(3):
        abm.step()
    restored = AdamBrownianMotion(optimizer, cfg, shapes, matrix_init_stds(model), seed=99)
    restored.load_state_dict(copy.deepcopy(abm.state_dict()))
    abm.step()
    restored.step()
    assert {k: float(v) for k, v in restored.norms().items()} == {k: float(v) for k, v in abm.norms().items()}
    with pytest.raises(ValueError, match="ABM shadows"):
        AdamBrownianMotion(
            one_group({"w": (3, 3)}, False, 0.1, 0.1), cfg, {"w": (3, 3)}, {"w": 0.02}, 0
        ).load_state_dict(abm.state_dict())


def rms(t: torch.Tensor) -> float:
    return t.detach().float().pow(2).mean().sqrt().item()


def test_trajectory_values_are_the_rms_of_w_and_w_eff_and_the_multiplier_statistics():
    model = FalconH1LM(replace(preset("tiny"), zero_init_readouts=False), LRMConfig("full"))  # a non-zero head
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lrm_" in name:
                p.mul_(1 + 0.5 * torch.randn_like(p))
    values = trajectory_metrics(model)
    for name, matrix in model.matrices().items():
        assert values[f"norm/{name}"] == pytest.approx(rms(matrix.weight), rel=1e-5), name
        assert values[f"norm_eff/{name}"] == pytest.approx(rms(matrix.effective_weight()), rel=1e-5), name
    assert values["norm_eff/lm_head"] != pytest.approx(values["norm/lm_head"])  # m and the multipliers count
    row = model.layers[0].self_attn.q_proj.lrm_row.detach()
    key = "lrm/layers.0.self_attn.q_proj.lrm_row"
    assert [values[f"{key}/{s}"] for s in ("mean", "std", "min", "max")] == pytest.approx(
        [row.mean().item(), row.std(correction=0).item(), row.min().item(), row.max().item()], rel=1e-5
    )
    assert values["lrm/lm_head.lrm_scalar"] == pytest.approx(model.lm_head.lrm_scalar.item())
