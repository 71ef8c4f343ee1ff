import pytest
import torch

from lrm_train.models import MATRIX_ROLES, PRESETS, FalconH1LM, preset
from lrm_train.nn import PLACEMENTS, Learnable, LRMConfig, MultipliedLinear, Parametrization, WidthClass
from lrm_train.optim import OptimConfig, ParamClass, ParamRole, build_optimizer, classify_parameters, parameter_roles


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_every_parameter_of_every_preset_and_placement_has_exactly_one_class(name, placement):
    with torch.device("meta"):
        model = FalconH1LM(preset(name), LRMConfig(placement, lm_head_rows=placement != "none"))
    classes = classify_parameters(model)
    assert list(classes) == [n for n, _ in model.named_parameters()]
    by_class = {c: [n for n, k in classes.items() if k is c] for c in ParamClass}
    assert by_class[ParamClass.EMBEDDING] == ["embed_tokens.weight"] and by_class[ParamClass.LM_HEAD] == [
        "lm_head.weight"
    ]
    assert all(n.rsplit(".", 1)[1].startswith("lrm_") for n in by_class[ParamClass.MULTIPLIER])
    assert bool(by_class[ParamClass.MULTIPLIER]) == (placement != "none")
    assert all(model.get_parameter(n).ndim == 2 for n in by_class[ParamClass.MATRIX])
    layers = model.cfg.num_hidden_layers
    assert len(by_class[ParamClass.MATRIX]) == 13 * layers  # q k v o; z x B C dt out_proj; gate up down
    assert len(by_class[ParamClass.NORM]) == 2 * layers + 1
    assert len(by_class[ParamClass.SSM_VECTOR]) == 5 * layers  # A_log, D, dt_bias, conv weight and bias


def test_mamba_gated_norm_is_a_norm():
    cfg = preset("tiny")
    cfg.mamba_rms_norm = True
    classes = classify_parameters(FalconH1LM(cfg))
    assert classes["layers.0.mamba.norm.weight"] is ParamClass.NORM


def test_an_unknown_parameter_fails_the_assertion():
    model = FalconH1LM(preset("tiny"), LRMConfig("none"))
    model.layers[0].extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(AssertionError, match="parameters without a class: layers.0.extra"):
        classify_parameters(model)


class TwoLayerFamily(torch.nn.Module):
    """Another model family: it only declares its parameters; optim and the engines need no edit for it."""

    def __init__(self, duplicate: bool = False) -> None:
        super().__init__()
        self.proj = MultipliedLinear(4, 4, learnable=Learnable(row=True), role="proj")
        self.gain = torch.nn.Parameter(torch.ones(4))
        self.duplicate = duplicate

    def parameter_roles(self):
        yield "proj.weight", ParamRole(ParamClass.MATRIX, "proj")
        yield "proj.lrm_row", ParamRole(ParamClass.MULTIPLIER, "proj")
        yield "gain", ParamRole(ParamClass.NORM)
        if self.duplicate:
            yield "gain", ParamRole(ParamClass.SSM_VECTOR)

    def width_scaling(self):
        return Parametrization.standard, 1.0

    def zero3_leaf_modules(self):
        return []


def test_a_model_family_declares_its_own_roles_and_each_parameter_is_checked_once():
    model = TwoLayerFamily()
    assert parameter_roles(model) == {
        "proj.weight": ParamRole(ParamClass.MATRIX, "proj"),
        "proj.lrm_row": ParamRole(ParamClass.MULTIPLIER, "proj"),
        "gain": ParamRole(ParamClass.NORM),
    }
    opt = build_optimizer(model, classify_parameters(model), OptimConfig())
    assert {g["param_class"]: g["names"] for g in opt.param_groups} == {
        "matrix": ["proj.weight"],
        "multiplier": ["proj.lrm_row"],
        "norm": ["gain"],
    }
    with pytest.raises(AssertionError, match="parameter gain was classified twice"):
        classify_parameters(TwoLayerFamily(duplicate=True))


def test_falcon_h1_roles_name_the_matrix_of_every_weight_and_multiplier():
    model = FalconH1LM(preset("tiny"), LRMConfig("full"))
    roles = parameter_roles(model)
    assert roles["layers.0.self_attn.q_proj.weight"] == ParamRole(ParamClass.MATRIX, "attn.q", WidthClass.hidden)
    assert roles["layers.0.mamba.in_proj.B.weight"] == ParamRole(ParamClass.MATRIX, "ssm.B", WidthClass.readout)
    assert roles["lm_head.weight"] == ParamRole(ParamClass.LM_HEAD, "lm_head", WidthClass.readout)
    assert roles["layers.0.self_attn.q_proj.lrm_row"] == ParamRole(ParamClass.MULTIPLIER, "attn.q")
    assert roles["layers.1.mamba.in_proj.dt.lrm_col"] == ParamRole(ParamClass.MULTIPLIER, "ssm.dt")
    assert roles["lm_head.lrm_scalar"] == ParamRole(ParamClass.MULTIPLIER, "lm_head")
    assert roles["embed_tokens.weight"] == ParamRole(ParamClass.EMBEDDING, "embedding", WidthClass.input)
    assert roles["layers.0.mamba.conv1d.bias"] == ParamRole(ParamClass.SSM_VECTOR)
    assert roles["final_layernorm.weight"] == ParamRole(ParamClass.NORM)
    assert {r.role for r in roles.values() if r.param_class is ParamClass.MATRIX} == set(MATRIX_ROLES) - {
        "embedding",
        "lm_head",
        "ssm.out_after_norm",
    }
