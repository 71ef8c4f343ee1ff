"""The static transplant: LRM's learned per-role scales folded into a baseline's fixed multipliers."""

import pytest
import torch
from runs import micro_config

from lrm_train.models import FalconH1LM, static_transplant
from lrm_train.nn import LRMConfig, learned_scales_by_role

# Non-trivial starting multipliers, so that each field's fold multiplies its own value.
START = dict(
    embedding_multiplier=2.0,
    lm_head_multiplier=0.5,
    key_multiplier=0.25,
    attention_out_multiplier=0.75,
    ssm_multipliers=[1.0, 0.5, 1.0, 1.0, 0.3],
    mlp_multipliers=[0.8, 0.6],
)


def alternating(n: int, mean: float, sign: float = 1.0) -> torch.Tensor:
    """``n`` (even) values 0.5 x mean, 1.5 x mean, ...: their mean is ``mean`` while no entry equals it."""
    return sign * mean * torch.tensor([0.5, 1.5]).repeat(n // 2)


@torch.no_grad()
def set_scale(layer, factor: float, col_sign: float = 1.0) -> None:
    """Row and column multipliers whose means put the matrix at ``factor`` times its muP value (init=mup: the row
    multipliers started at it)."""
    layer.lrm_row.copy_(alternating(len(layer.lrm_row), layer.mup_multiplier * factor))
    layer.lrm_col.copy_(alternating(len(layer.lrm_col), 1.0, col_sign))


def test_the_fold_is_scalar_times_mean_row_times_mean_col_geometric_over_layers_into_the_config_fields():
    model = FalconH1LM(micro_config(**START), LRMConfig(placement="full", init="mup"))
    first, second = model.layers
    with torch.no_grad():
        model.lm_head.lrm_scalar.fill_(0.5 * 3)  # x3 of its muP value 0.5
    set_scale(model.embed_tokens, 3.0)
    set_scale(first.self_attn.q_proj, 2.0)
    set_scale(second.self_attn.q_proj, 8.0)  # q: geometric mean of x2 and x8, x4
    for layer in model.layers:
        set_scale(layer.self_attn.k_proj, 0.5)
        set_scale(layer.self_attn.v_proj, 2.0)
        set_scale(layer.self_attn.o_proj, 3.0)
        set_scale(layer.mamba.in_proj["x"], 2.0, col_sign=-1.0)  # a sign flip: only the size of a scale counts
        set_scale(layer.mamba.in_proj["dt"], 4.0)
        set_scale(layer.feed_forward.gate_proj, 5.0)
        set_scale(layer.feed_forward.up_proj, 2.0)
        set_scale(layer.feed_forward.down_proj, 0.25)
    scales = learned_scales_by_role([model])
    assert scales["attn.q"] == pytest.approx(4.0) and scales["ssm.x"] == pytest.approx(2.0)
    assert scales["ssm.z"] == pytest.approx(1.0)  # not moved
    folded = static_transplant([model])
    expected = dict(
        embedding_multiplier=2.0 * 3,
        lm_head_multiplier=0.5 * 3,
        attention_in_multiplier=1.0 * 4,  # q's factor
        key_multiplier=0.25 * 0.5 / 4,  # k's over q's: k's matrix gets 4 x 0.5 / 4
        attention_out_multiplier=0.75 * 3 * 2 / 4,  # o's, with v's over q's (v's output reaches o linearly)
        ssm_in_multiplier=1.0,
        ssm_out_multiplier=1.0,
        ssm_multipliers=[1.0, 0.5 * 2, 1.0, 1.0, 0.3 * 4],
        mlp_multipliers=[0.8 * 5, 0.6 * 0.25 * 2],  # up's factor folded into down's
    )
    assert folded.keys() == expected.keys()
    assert all(folded[key] == pytest.approx(value) for key, value in expected.items()), folded
    baseline = FalconH1LM(micro_config(**{**START, **folded}), LRMConfig(placement="none"))
    for role, factor in dict(embedding=3, lm_head=3, **{"attn.k": 0.5, "ssm.dt": 4, "mlp.gate": 5}).items():
        assert baseline.cfg.matrix_multiplier(role) == pytest.approx(model.cfg.matrix_multiplier(role) * factor)


def test_several_models_are_averaged_geometrically_and_init_one_counts_from_the_fixed_multiplier():
    models = [FalconH1LM(micro_config(**START), LRMConfig(placement="full", init="one")) for _ in range(2)]
    for model, factor in zip(models, (2.0, 8.0)):
        with torch.no_grad():
            model.lm_head.lrm_scalar.fill_(factor)  # init=one: the scalar started at 1, m stays fixed
    assert learned_scales_by_role(models)["lm_head"] == pytest.approx(4.0)
    assert static_transplant(models)["lm_head_multiplier"] == pytest.approx(0.5 * 4)
    start = micro_config(**START)
    unmoved = static_transplant([FalconH1LM(start, LRMConfig(placement="full", init="mup"))])
    assert all(value == pytest.approx(getattr(start, key)) for key, value in unmoved.items())  # nothing learned
