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
    build_optimizer,
    class_table,
    classify_parameters,
    set_learning_rates,
)


def build(name, **kwargs):
    model = FalconH1LM(preset("tiny"), LRMConfig("full", weight_decay=2e-3))
    cfg = OptimConfig(name=name, lr=1e-3, weight_decay=0.1, **kwargs)
    return model, build_optimizer(model, classify_parameters(model), cfg, LRMConfig("full", weight_decay=2e-3))


def test_each_class_gets_its_lr_and_wd_and_multipliers_their_own_decay():
    _, opt = build("adamw", embedding=ClassHyper(lr_mult=2.0, wd_mult=0.5))
    rows = {r["class"]: r for r in class_table(opt)}
    assert rows["embedding"]["lr"] == 2e-3 and rows["embedding"]["wd"] == 0.05
    assert rows["multiplier"]["wd"] == 2e-3 and rows["norm"]["wd"] == 0.0 and rows["ssm_vector"]["wd"] == 0.0
    assert {r["optimizer"] for r in rows.values()} == {"adamw"}
    set_learning_rates(opt, 1e-3, 0.5)
    assert {r["class"]: r["lr"] for r in class_table(opt)}["embedding"] == 1e-3


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
