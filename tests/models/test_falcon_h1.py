import dataclasses

import pytest
import torch
from runs import GROUPED_HEADS, micro_config

from lrm_train.models import MATRIX_ROLES, FalconH1Config, FalconH1LM, falcon_h1, preset
from lrm_train.models.falcon_h1 import learnable, rotary_cos_sin
from lrm_train.models.io import load_model, save_model
from lrm_train.nn import PLACEMENTS, Learnable, LRMConfig

# Multipliers away from 1, so a forward or a merge that drops one is seen.
MULTIPLIERS = dict(key_multiplier=0.5, ssm_multipliers=[0.5, 0.7, 0.9, 1.1, 0.3], mlp_multipliers=[0.8, 0.6])


def small(**overrides):
    return micro_config(**{**GROUPED_HEADS, **MULTIPLIERS, **overrides})


def test_forward_returns_logits():
    model = FalconH1LM(small())
    assert model(torch.randint(0, 64, (3, 10))).shape == (3, 10, 64)


@pytest.mark.parametrize("placement", [p for p in PLACEMENTS if p != "none"])
@pytest.mark.parametrize("mamba_rms_norm", [False, True])
def test_gradient_reaches_every_parameter_and_multiplier(placement, mamba_rms_norm):
    model = FalconH1LM(small(mamba_rms_norm=mamba_rms_norm), LRMConfig(placement))
    ids = torch.randint(0, 64, (2, 9))
    model(ids).logsumexp(-1).pow(2).mean().backward()
    multipliers = [n for n, _ in model.named_parameters() if ".lrm_" in n]
    assert multipliers
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_placement_none_has_no_multiplier_and_full_has_them_on_every_matrix():
    assert not [n for n, _ in FalconH1LM(small(), LRMConfig("none")).named_parameters() if "lrm_" in n]
    model = FalconH1LM(small(), LRMConfig("full"))
    for name, matrix in model.matrices().items():
        expected = {"lrm_scalar"} if name == "lm_head" else {"lrm_row", "lrm_col"}
        assert {n for n, _ in matrix.named_parameters() if n.startswith("lrm_")} == expected, name


def test_placements():
    assert all(learnable(LRMConfig("none"), role) == Learnable() for role in MATRIX_ROLES)
    assert all(learnable(LRMConfig("scalar"), role) == Learnable(scalar=True) for role in MATRIX_ROLES)
    full = LRMConfig("full")
    assert all(learnable(full, r) == Learnable(row=True, col=True) for r in MATRIX_ROLES if r != "lm_head")
    assert learnable(full, "lm_head") == Learnable(scalar=True)
    assert learnable(LRMConfig("full", lm_head_rows=True), "lm_head") == Learnable(scalar=True, row=True)
    assert learnable(LRMConfig("symmetry_free", lm_head_rows=True), "lm_head") == Learnable(row=True)
    row, row_col, none = Learnable(row=True), Learnable(row=True, col=True), Learnable()
    symmetry_free = {
        "embedding": row_col, "lm_head": none,
        "attn.q": row, "attn.k": none, "attn.v": none, "attn.o": row_col,
        "mlp.gate": row, "mlp.up": none, "mlp.down": row_col,
        "ssm.z": row, "ssm.x": none, "ssm.B": none, "ssm.C": none, "ssm.dt": row,
        "ssm.out": row_col, "ssm.out_after_norm": row,
    }  # fmt: skip
    assert set(MATRIX_ROLES) == set(symmetry_free)
    assert {role: learnable(LRMConfig("symmetry_free"), role) for role in MATRIX_ROLES} == symmetry_free
    with pytest.raises(KeyError, match="unknown matrix role 'attn.qq'"):
        learnable(full, "attn.qq")


@pytest.mark.parametrize("mamba_rms_norm", [False, True])
def test_symmetry_free_model_carries_the_table(mamba_rms_norm):
    model = FalconH1LM(small(mamba_rms_norm=mamba_rms_norm), LRMConfig("symmetry_free"))
    out_proj = model.layers[1].mamba.out_proj
    assert out_proj.role == ("ssm.out_after_norm" if mamba_rms_norm else "ssm.out")
    for name, matrix in model.matrices().items():
        carried = Learnable(*(getattr(matrix, n) is not None for n in ("lrm_scalar", "lrm_row", "lrm_col")))
        assert carried == learnable(LRMConfig("symmetry_free"), matrix.role), name


@pytest.mark.parametrize("init", ["one", "mup"])
@pytest.mark.parametrize("placement", ["scalar", "full", "symmetry_free"])
def test_merged_model_is_the_plain_mup_model_and_saves_and_loads(tmp_path, placement, init):
    model = FalconH1LM(small(mamba_rms_norm=True), LRMConfig(placement, init=init, lm_head_rows=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lrm_" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    ids = torch.randint(0, 64, (2, 9))
    expected = model(ids).detach()
    model.merge_multipliers_()
    assert model.lrm.placement == "none" and not [n for n, _ in model.named_parameters() if "lrm_" in n]
    torch.testing.assert_close(model(ids), expected)
    plain = FalconH1LM(model.cfg, LRMConfig("none"))
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain(ids), expected)
    save_model(model, tmp_path / "merged")
    torch.testing.assert_close(load_model(tmp_path / "merged")(ids), expected)


def test_causality_changing_token_t_never_changes_earlier_logits():
    model = FalconH1LM(small(mamba_rms_norm=True), LRMConfig("full"))
    ids = torch.randint(0, 64, (1, 11))
    base = model(ids)
    for t in (0, 4, 10):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 1) % 64
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t], base[:, t])


def test_init_mup_and_init_one_compute_the_same_function():
    torch.manual_seed(3)
    one = FalconH1LM(small(), LRMConfig("full", init="one"))
    torch.manual_seed(3)
    mup = FalconH1LM(small(), LRMConfig("full", init="mup"))
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(mup(ids), one(ids))
    assert mup.layers[0].self_attn.k_proj.lrm_row.unique().item() == 0.5


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(num_attention_heads=5), "num_attention_heads"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(mamba_d_ssm=40), "mamba_d_ssm"),
        (dict(mamba_n_groups=3), "mamba_n_groups"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_attention_heads=4, head_dim=7), "head_dim"),
        (dict(ssm_multipliers=[1.0, 1.0]), "ssm_multipliers"),
        (dict(lm_head_multiplier=0.0), "lm_head_multiplier"),
        (dict(vocab_size=3.5), "vocab_size"),
    ],
)
def test_impossible_shape_raises_one_clear_error(overrides, field):
    with pytest.raises(ValueError, match=rf"model\.{field}") as info:
        small(**overrides)
    assert "\n" not in str(info.value)


def test_width_family_scales_heads_not_head_dims():
    narrow, wide = preset("width_256"), preset("width_2048")
    assert narrow.attention_head_dim == wide.attention_head_dim == 64
    assert wide.num_attention_heads == 8 * narrow.num_attention_heads
    assert wide.mamba_n_heads == 8 * narrow.mamba_n_heads


def test_config_round_trips_through_asdict():
    cfg = small()
    assert FalconH1Config(**dataclasses.asdict(cfg)) == cfg


def test_rope_tables_are_buffers_built_once_and_never_saved(monkeypatch):
    model = FalconH1LM(small())
    assert not [key for key in model.state_dict() if key.startswith("rotary.")]
    built = []
    monkeypatch.setattr(falcon_h1, "rotary_cos_sin", lambda *args: built.append(args) or rotary_cos_sin(*args))
    cos, sin = model.rotary(10)
    model(torch.randint(0, 64, (2, 10)))
    assert not built  # no table is computed per forward
    expected_cos, expected_sin = rotary_cos_sin(10, model.cfg.attention_head_dim, model.cfg.rope_theta)
    assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)


def test_a_sequence_longer_than_the_rope_tables_grows_them_with_the_same_values(monkeypatch):
    ids = torch.randint(0, 64, (1, 12))
    torch.manual_seed(0)
    reference = FalconH1LM(small())
    monkeypatch.setattr(falcon_h1.RotaryTables, "INITIAL_LENGTH", 5)
    torch.manual_seed(0)
    model = FalconH1LM(small())
    assert model.rotary.cos.shape[0] == 5
    assert torch.equal(model(ids), reference(ids))
    assert model.rotary.cos.shape[0] == 12
