import pytest
import torch

from lrm_train.models import PRESETS, FalconH1LM, preset
from lrm_train.nn import PLACEMENTS, LRMConfig
from lrm_train.optim import ParamClass, classify_parameters


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
