import dataclasses

import pytest
import torch

from lrm_train.models import FalconH1LM, preset
from lrm_train.nn import LRMConfig
from lrm_train.optim import (
    AdjustLR,
    ClassHyper,
    Muon,
    NSDtype,
    OptimConfig,
    OptimizerName,
    RoleHyper,
    build_optimizer,
    class_table,
    classify_parameters,
    format_table,
    set_learning_rates,
)


def build(name, **kwargs):
    # The class and role logic at one width: LRs scaled by width (tiny's muP) are tests/nn/test_parametrization.py's.
    model = FalconH1LM(dataclasses.replace(preset("tiny"), parametrization="standard"), LRMConfig("full"))
    cfg = OptimConfig(name=name, lr=1e-3, weight_decay=0.1, multiplier_weight_decay=2e-3, **kwargs)
    optimizer = build_optimizer(model, classify_parameters(model), cfg)
    set_learning_rates(optimizer, cfg.lr)  # as the trainer does before a step where the schedule's factor is 1
    return model, optimizer


def test_each_class_gets_its_lr_and_wd_and_multipliers_their_own_decay():
    _, opt = build("adamw", embedding=ClassHyper(lr_mult=2.0, wd_mult=0.5))
    rows = {r["group"]: r for r in class_table(opt)}
    assert rows["embedding"]["lr"] == 2e-3 and rows["embedding"]["wd"] == 0.05
    assert rows["multiplier"]["wd"] == 2e-3 and rows["norm"]["wd"] == 0.0 and rows["ssm_vector"]["wd"] == 0.0
    assert {r["optimizer"] for r in rows.values()} == {"adamw"}
    set_learning_rates(opt, 1e-3 * 0.5)
    assert {r["group"]: r["lr"] for r in class_table(opt)}["embedding"] == 1e-3


def test_muon_takes_the_matrices_and_only_them():
    model, opt = build("muon")
    muon = [o for o in opt.optimizers if isinstance(o, Muon)]
    assert len(muon) == 1
    held = {id(p) for g in muon[0].param_groups for p in g["params"]}
    classes = classify_parameters(model)
    for name, p in model.named_parameters():
        assert (id(p) in held) == (classes[name].value == "matrix"), name


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_loaded_state_has_the_values_saved_and_continues_identically(name):
    model, opt = build(name)
    ids = torch.randint(0, 100, (2, 8))
    model(ids).sum().backward()
    opt.step()
    opt.zero_grad()
    fresh_model, fresh = build(name)
    fresh_model.load_state_dict(model.state_dict())
    for (_, p), (_, q) in zip(model.named_parameters(), fresh_model.named_parameters()):
        # As a checkpoint brings it back: on another device or in another dtype than the parameter (here float64).
        fresh.load_param_state(q, {k: v.double() for k, v in opt.state[p].items()})
    for (_, p), (_, q) in zip(model.named_parameters(), fresh_model.named_parameters()):
        saved, loaded = opt.state[p], fresh.state[q]
        assert loaded.keys() == saved.keys()
        for key, value in loaded.items():
            torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
            if key == "step":
                assert (value.device.type, value.dtype) == ("cpu", torch.float32)
            else:
                assert (value.device, value.dtype) == (q.device, q.dtype)
    for m, o in ((model, opt), (fresh_model, fresh)):
        m(ids).pow(2).mean().backward()
        o.step()
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_string_choices_are_enums_that_yaml_spells_as_before():
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(OptimConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, {"name": "muon", "muon_adjust_lr": "original"}))
    assert cfg.name is OptimizerName.muon and cfg.muon_adjust_lr is AdjustLR.original
    assert cfg.muon_ns_dtype is NSDtype.auto and cfg.name == "muon"
    assert "name: muon" in OmegaConf.to_yaml(OmegaConf.structured(cfg))
    with pytest.raises(Exception, match="keller"):
        OmegaConf.merge(schema, {"muon_adjust_lr": "keller"})
    with pytest.raises(ValueError, match="optim.name='sgd' is not one of adamw, muon"):
        OptimConfig(name="sgd")


def groups_of(opt) -> dict[str, dict]:
    return {g["name"]: g for g in opt.param_groups}


def test_roles_get_their_own_lr_and_wd_on_top_of_their_class():
    model, opt = build(
        "muon",
        embedding=ClassHyper(lr_mult=2.0),
        multiplier=ClassHyper(wd_mult=0.5),
        roles=[
            RoleHyper(pattern="attn.*", lr_mult=0.5, wd_mult=0.0),
            RoleHyper(pattern="ssm.dt", multipliers=True, lr_mult=3.0, wd_mult=2.0),
            RoleHyper(pattern="embedding", lr_mult=1.5),
        ],
    )
    groups = groups_of(opt)
    attn = groups["matrix/attn.*"]
    assert attn["lr"] == 1e-3 * 0.5 and attn["weight_decay"] == 0.0 and attn["use_muon"]
    assert {n.split(".")[-2] for n in attn["names"]} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert groups["matrix"]["lr"] == 1e-3 and groups["matrix"]["weight_decay"] == 0.1
    assert not any("self_attn" in n for n in groups["matrix"]["names"])
    dt = groups["multiplier/ssm.dt"]
    assert dt["lr"] == pytest.approx(3e-3) and dt["weight_decay"] == pytest.approx(2e-3 * 0.5 * 2.0)
    assert all(".in_proj.dt.lrm_" in n for n in dt["names"]) and not dt["use_muon"]
    assert groups["multiplier"]["weight_decay"] == pytest.approx(1e-3)  # multiplier_weight_decay x multiplier.wd_mult
    assert groups["embedding/embedding"]["lr"] == pytest.approx(1e-3 * 2.0 * 1.5)
    assert "embedding" not in groups  # its only parameter moved to the role group
    held = [n for g in opt.param_groups for n in g["names"]]
    assert sorted(held) == sorted(n for n, _ in model.named_parameters())  # each parameter in exactly one group
    set_learning_rates(opt, 1e-3 * 0.5)
    assert groups_of(opt)["matrix/attn.*"]["lr"] == pytest.approx(1e-3 * 0.5 * 0.5)
    table = format_table(class_table(opt))
    assert any(line.split()[:2] == ["matrix/attn.*", "16"] for line in table.splitlines())  # 4 layers x q k v o


@pytest.mark.parametrize(
    "roles,message",
    [
        ([RoleHyper(pattern="attn.qq")], r"optim.roles\[0\].pattern='attn.qq' matches no matrix weight"),
        ([RoleHyper(pattern="mlp.up", multipliers=True)], "matches no multiplier"),
        ([RoleHyper(pattern="attn.*"), RoleHyper(pattern="attn.q")], "matched by both 'attn.\\*' and 'attn.q'"),
    ],
)
def test_a_role_pattern_that_matches_nothing_or_twice_is_an_error(roles, message):
    # mlp.up carries no multiplier under symmetry_free
    placement = "symmetry_free" if "no multiplier" in message else "full"
    model = FalconH1LM(preset("tiny"), LRMConfig(placement))
    with pytest.raises(ValueError, match=message):
        build_optimizer(model, classify_parameters(model), OptimConfig(roles=roles))


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(lr=-1.0), "optim.lr=-1.0"),
        (dict(betas=[0.9, 1.0]), r"optim.betas\[1\]=1.0 must be in \[0, 1\)"),
        (dict(betas=[-0.1, 0.9]), r"optim.betas\[0\]"),
        (dict(eps=-1e-8), "optim.eps"),
        (dict(weight_decay=-0.1), "optim.weight_decay"),
        (dict(multiplier_weight_decay=-1.0), "optim.multiplier_weight_decay=-1.0 must be >= 0"),
        (dict(embedding=ClassHyper(lr_mult=-1.0)), "optim.embedding.lr_mult"),
        (dict(roles=[RoleHyper(pattern="attn.q", wd_mult=-1.0)]), r"optim.roles\[0\].wd_mult"),
    ],
)
def test_impossible_optimizer_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key) as info:
        OptimConfig(**kwargs)
    assert "\n" not in str(info.value)
