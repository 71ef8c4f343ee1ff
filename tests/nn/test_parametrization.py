"""Parametrizations: each matrix class's init std, forward multiplier, LR, weight decay and AdamW epsilon follow the
width as ``nn/parametrization.py`` says, the standard one changes nothing, and the two muP forms train identically."""

import dataclasses

import pytest
import torch
from runs import micro_config

from lrm_train.models import FalconH1LM, preset, width_family
from lrm_train.nn import LRMConfig
from lrm_train.optim import OptimConfig, build_optimizer, classify_parameters, set_learning_rates

ROLES = ("embedding", "lm_head", "attn.q", "attn.k", "attn.o", "ssm.z", "ssm.B", "ssm.C", "ssm.out", "mlp.gate",
         "mlp.up", "mlp.down")  # fmt: skip


def test_standard_applies_the_config_as_given_and_the_0p5b_preset_is_unchanged():
    cfg = preset("falcon_h1_0p5b")
    assert cfg.parametrization == "standard" and cfg.width_ratio == 1.0
    assert cfg.matrix_multiplier("lm_head") == 0.0390625 and cfg.matrix_multiplier("attn.k") == 1.0 * 0.390625
    assert cfg.matrix_multiplier("ssm.B") == 1.25 * 0.353553 and cfg.matrix_multiplier("mlp.up") == 1.0
    assert all(cfg.matrix_init_std(role) == 0.02 for role in ROLES)
    hf = cfg.hf_multipliers()
    assert {k: hf[k] for k in ("lm_head_multiplier", "key_multiplier", "attention_out_multiplier")} == {
        "lm_head_multiplier": 0.0390625, "key_multiplier": 0.390625, "attention_out_multiplier": 0.9375}  # fmt: skip
    assert hf["mlp_multipliers"] == [0.883883, 0.5859375]
    assert hf["ssm_multipliers"] == pytest.approx([0.353553, 0.25, 0.353553, 0.5, 0.353553], rel=1e-12)


@pytest.mark.parametrize("parametrization", ["mup", "mup_multiplier_adamw", "mup_multiplier_muon"])
def test_at_the_base_width_every_form_is_the_standard_one(parametrization):
    standard = micro_config(lm_head_multiplier=0.3, base_width=32)
    scaled = micro_config(lm_head_multiplier=0.3, base_width=32, parametrization=parametrization)
    for role in ROLES:
        assert scaled.matrix_multiplier(role) == standard.matrix_multiplier(role)
        assert scaled.matrix_init_std(role) == standard.matrix_init_std(role)


# At a quarter of the base width (r = 1/4): (multiplier factor, init std factor) by role.
EXPECTED = {
    "mup": {"embedding": (1, 1), "lm_head": (4, 0.5), "ssm.B": (4, 0.5), "attn.q": (1, 2), "mlp.up": (1, 2)},
    "mup_multiplier_adamw": {
        "embedding": (1, 1), "lm_head": (4, 0.5), "ssm.C": (4, 0.5), "attn.q": (4, 0.5), "mlp.up": (4, 0.5)},
    "mup_multiplier_muon": {
        "embedding": (1, 1), "lm_head": (4, 0.5), "ssm.B": (4, 0.5), "attn.o": (2, 1), "mlp.up": (2, 1)},
}  # fmt: skip


@pytest.mark.parametrize("parametrization", EXPECTED)
def test_each_class_scales_as_the_table_says(parametrization):
    standard = micro_config(base_width=128)
    scaled = micro_config(base_width=128, parametrization=parametrization)
    assert scaled.width_ratio == 0.25
    for role, (multiplier, std) in EXPECTED[parametrization].items():
        assert scaled.matrix_multiplier(role) == pytest.approx(standard.matrix_multiplier(role) * multiplier), role
        assert scaled.matrix_init_std(role) == pytest.approx(0.02 * std), role
    weight = FalconH1LM(scaled, LRMConfig("none")).layers[0].feed_forward.up_proj.weight
    assert weight.std().item() == pytest.approx(0.02 * EXPECTED[parametrization]["mlp.up"][1], rel=0.1)


@pytest.mark.parametrize("parametrization", EXPECTED)
def test_a_random_readouts_initial_output_is_the_same_at_every_width(parametrization):
    # Mamba's B starts random (with C at zero, its product must not be zero too): its initial output on inputs of
    # order-one coordinates must not depend on the width, or the scan's first steps mix a width-dependent part in.
    torch.manual_seed(0)
    rms = {}
    for width in (128, 1024):
        cfg = micro_config(base_width=1024, hidden_size=width, parametrization=parametrization)
        B = FalconH1LM(cfg, LRMConfig("none")).layers[0].mamba.in_proj["B"]
        with torch.no_grad():
            rms[width] = B(torch.randn(4096, width)).pow(2).mean().sqrt().item()
    assert rms[1024] == pytest.approx(rms[128], rel=0.1)


@pytest.mark.parametrize(("optimizer", "lr_mult"), [("adamw", 4.0), ("muon", 2.0)])
def test_under_mup_the_optimizer_scales_hidden_lrs_and_keeps_lr_times_wd(optimizer, lr_mult):
    model = FalconH1LM(micro_config(base_width=128, parametrization="mup"), LRMConfig("full"))
    groups = build_optimizer(model, classify_parameters(model), OptimConfig(name=optimizer)).param_groups
    by_name = {g["name"]: g for g in groups}
    hidden, readout = by_name["matrix@hidden"], by_name["matrix"]
    assert (hidden["lr_mult"], hidden["weight_decay"]) == pytest.approx((lr_mult, 0.1 / lr_mult))
    assert {n.rsplit(".", 2)[-2] for n in readout["names"]} == {"B", "C"} and readout["lr_mult"] == 1.0
    assert all(by_name[c]["lr_mult"] == 1.0 for c in ("embedding", "lm_head", "multiplier", "norm", "ssm_vector"))
    through_multiplier = FalconH1LM(micro_config(base_width=128, parametrization=f"mup_multiplier_{optimizer}"))
    through_multiplier_groups = build_optimizer(
        through_multiplier, classify_parameters(through_multiplier), OptimConfig(name=optimizer)
    ).param_groups
    assert all(g["lr_mult"] == 1.0 for g in groups if g is not hidden)
    assert all(g["lr_mult"] == 1.0 for g in through_multiplier_groups)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_measured_hidden_lr_exponent_replaces_the_derived_one_for_hidden_matrices_only(optimizer):
    model = FalconH1LM(micro_config(base_width=128, parametrization="mup"), LRMConfig("full"))  # r = 1/4
    groups = build_optimizer(
        model, classify_parameters(model), OptimConfig(name=optimizer, hidden_lr_exponent=-0.75)
    ).param_groups
    by_name = {g["name"]: g for g in groups}
    assert (by_name["matrix@hidden"]["lr_mult"], by_name["matrix@hidden"]["weight_decay"]) == pytest.approx(
        (4**0.75, 0.1 / 4**0.75)
    )
    assert all(g["lr_mult"] == 1.0 for name, g in by_name.items() if name != "matrix@hidden")


# AdamW's epsilon at a quarter of the base width (r = 1/4), as a multiple of optim.eps, by group.
EXPECTED_EPS = {
    "standard": {"matrix": 1, "embedding": 1, "lm_head": 1, "multiplier": 1, "norm": 1, "ssm_vector": 1},
    "mup": {"matrix@hidden": 4, "matrix": 4, "embedding": 4, "lm_head": 4, "multiplier": 4, "norm": 4, "ssm_vector": 4},
    "mup_multiplier_adamw": {
        "matrix@hidden": 16, "matrix": 4, "embedding": 4, "lm_head": 4, "multiplier": 4, "norm": 4, "ssm_vector": 4},
}  # fmt: skip


@pytest.mark.parametrize("parametrization", EXPECTED_EPS)
def test_adamws_epsilon_scales_as_the_gradients_of_each_group(parametrization):
    model = FalconH1LM(micro_config(base_width=128, parametrization=parametrization), LRMConfig("full"))
    groups = build_optimizer(model, classify_parameters(model), OptimConfig(eps=1e-8)).param_groups
    assert {g["name"]: g["eps"] / 1e-8 for g in groups} == pytest.approx(EXPECTED_EPS[parametrization])


def test_adamws_epsilon_is_measured_against_real_gradients():
    """Each group's gradient entries scale with the width as its epsilon does (within a factor 2 over an 8x width
    range): the derivation checked on the model at two widths, at the second step (the first moves only the zero LM
    head, which then carries muP's 1/d backward). Mamba's B and C (the ``matrix`` group: the readouts that are not
    the LM head) are the exception: their output's gradient sums every head's contribution, and early in training
    those add up like noise, so their gradients fall faster than the derived r^-1 (about r^-1.3 here)."""
    scales = {}
    for width in (64, 512):
        torch.manual_seed(0)
        model = FalconH1LM(dataclasses.replace(
            width_family(width, num_hidden_layers=1, vocab_size=512, head_dim=16, d_state=16), base_width=512))  # fmt: skip
        opt = build_optimizer(model, classify_parameters(model), OptimConfig(eps=1e-8))
        ids = torch.randint(0, 512, (8, 33), generator=torch.Generator().manual_seed(1))
        for _ in range(2):
            set_learning_rates(opt, 1e-3)
            opt.zero_grad()
            model(ids[:, :-1], ids[:, 1:]).loss.backward()
            opt.step()
        # A learnable scalar's gradient is of order one (far above epsilon at any width): rows and columns set the rule.
        scales[width] = {
            g["name"]: (
                torch.cat([p.grad.flatten() for n, p in zip(g["names"], g["params"]) if not n.endswith("lrm_scalar")])
                .pow(2).mean().sqrt().item(),
                g["eps"],
            )
            for g in opt.param_groups
        }  # fmt: skip
    for name, (gradient, eps) in scales[512].items():
        gradient_ratio, eps_ratio = gradient / scales[64][name][0], eps / scales[64][name][1]
        low = eps_ratio * 8**-0.5 if name == "matrix" else eps_ratio / 2
        assert low < gradient_ratio < eps_ratio * (1 if name == "matrix" else 2), (name, gradient_ratio, eps_ratio)


def train_steps(parametrization: str, optimizer: str, steps: int = 3) -> torch.Tensor:
    torch.manual_seed(0)
    model = FalconH1LM(micro_config(base_width=128, parametrization=parametrization), LRMConfig("full"))
    # An epsilon large enough to matter: scaled with the gradients, it keeps the two forms' symmetry.
    opt = build_optimizer(model, classify_parameters(model), OptimConfig(name=optimizer, eps=1e-3))
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        set_learning_rates(opt, 1e-2)
        opt.zero_grad()
        model(ids[:, :-1], ids[:, 1:]).loss.backward()
        opt.step()
    with torch.no_grad():
        return model(ids[:, :-1])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_two_mup_forms_train_identically(optimizer):
    """Adam's (and Muon's) reparametrization symmetry: LR and WD scaled in the optimizer, or the same scale carried by
    the forward multipliers with the init std compensating, give the same effective weights step after step."""
    standard_form = train_steps("mup", optimizer)
    multiplier_form = train_steps(f"mup_multiplier_{optimizer}", optimizer)
    assert not torch.allclose(standard_form, train_steps("standard", optimizer), rtol=1e-2)  # the test can fail
    torch.testing.assert_close(multiplier_form, standard_form, rtol=1e-4, atol=1e-4)
