"""Logits equal to transformers' FalconH1 (float32, relative error < 1e-4), in both directions."""

import json

import pytest
import torch
from transformers import FalconH1Config as HFConfig
from transformers import FalconH1ForCausalLM

from lrm_train.hf import export_hf, import_hf
from lrm_train.hf.__main__ import main as hf_cli
from lrm_train.models import FalconH1Config, FalconH1LM
from lrm_train.models.io import load_model
from lrm_train.nn import PLACEMENTS, LRMConfig

# fmt: off
NON_DEFAULT_MULTIPLIERS = dict(
    embedding_multiplier=2.5, lm_head_multiplier=0.3, key_multiplier=0.4, attention_in_multiplier=1.3,
    attention_out_multiplier=0.7, ssm_in_multiplier=1.25, ssm_out_multiplier=0.8,
    ssm_multipliers=[0.35, 0.25, 0.6, 0.5, 0.9], mlp_multipliers=[0.88, 0.59],
)
# fmt: on

SHAPES = {
    "mha_one_group": dict(num_attention_heads=4, num_key_value_heads=4, mamba_n_groups=1, mamba_rms_norm=False),
    "gqa2_two_groups_norm": dict(num_attention_heads=4, num_key_value_heads=2, mamba_n_groups=2, mamba_rms_norm=True),
    "mqa_four_groups_norm_after_gate": dict(
        num_attention_heads=4,
        num_key_value_heads=1,
        mamba_n_groups=4,
        mamba_rms_norm=True,
        mamba_norm_before_gate=False,
    ),
}


def hf_model(shape, **overrides):
    # fmt: off
    config = HFConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, head_dim=12, mamba_d_ssm=64,
        mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=8,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4}, **NON_DEFAULT_MULTIPLIERS,
        **{**SHAPES[shape], **overrides},
    )
    # fmt: on
    model = FalconH1ForCausalLM(config).eval()
    with torch.no_grad():  # random values everywhere, norms and SSM vectors included
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seq_len", [5, 8, 21])
def test_import_gives_transformers_logits(tmp_path, shape, seq_len):
    reference = hf_model(shape)
    reference.save_pretrained(tmp_path)
    ids = torch.randint(0, 97, (2, seq_len))
    with torch.no_grad():
        expected = reference(ids).logits
        for placement in PLACEMENTS:
            for init in ("one", "mup"):
                model = import_hf(tmp_path, LRMConfig(placement, init))
                assert rel_error(model(ids), expected) < 1e-4, (placement, init)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("placement", ["full", "symmetry_free", "scalar"])
def test_export_with_random_multipliers_reloads_in_transformers(tmp_path, shape, placement):
    hf_model(shape).save_pretrained(tmp_path / "src")
    model = import_hf(tmp_path / "src", LRMConfig(placement, init="mup", lm_head_rows=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lrm_" in name or name.startswith("lrm_"):
                p.mul_(1 + 0.3 * torch.randn_like(p))
    ids = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        ours = model(ids)
        export_hf(model, tmp_path / "out")
        reloaded = FalconH1ForCausalLM.from_pretrained(tmp_path / "out").eval()
        assert rel_error(reloaded(ids).logits, ours) < 1e-4
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


def test_import_reads_sharded_checkpoints(tmp_path):
    reference = hf_model("gqa2_two_groups_norm")
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = torch.randint(0, 97, (1, 11))
    with torch.no_grad():
        assert rel_error(import_hf(tmp_path)(ids), reference(ids).logits) < 1e-4


def test_cli_import_then_export_round_trip(tmp_path, capsys):
    reference = hf_model("gqa2_two_groups_norm")
    reference.save_pretrained(tmp_path / "hf")
    assert hf_cli(["import", str(tmp_path / "hf"), str(tmp_path / "ours"), "--placement", "symmetry_free"]) == 0
    ours = load_model(tmp_path / "ours")
    assert ours.lrm.placement == "symmetry_free"
    assert hf_cli(["export", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    ids = torch.randint(0, 97, (1, 12))
    back = FalconH1ForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert rel_error(back(ids).logits, reference(ids).logits) < 1e-5
    assert hf_cli(["export", str(tmp_path / "ours"), str(tmp_path / "back")]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err


def test_import_refuses_unsupported_features_and_broken_folders(tmp_path, capsys):
    hf_model("mha_one_group").save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "projectors_bias": True}))
    with pytest.raises(ValueError, match="projectors_bias=True is not supported"):
        import_hf(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "mamba_d_ssm": 60}))
    with pytest.raises(ValueError, match="model.mamba_d_ssm=60"):
        import_hf(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"not a tensor file")
    capsys.readouterr()
    assert hf_cli(["import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors" in err
    assert not (tmp_path / "ours").exists()
    assert hf_cli(["import", str(tmp_path / "missing"), str(tmp_path / "ours")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("parametrization", ["mup", "mup_multiplier_adamw", "mup_multiplier_muon"])
def test_a_width_scaled_model_exports_its_forward_at_its_width(tmp_path, parametrization):
    # Width 48 of a model tuned at 192: every multiplier is scaled, up's (which Hugging Face lacks) folded into down's.
    # fmt: off
    cfg = FalconH1Config(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, head_dim=12, num_attention_heads=4,
        num_key_value_heads=2, mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=8,
        parametrization=parametrization, base_width=192, **NON_DEFAULT_MULTIPLIERS,
    )
    # fmt: on
    model = FalconH1LM(cfg, LRMConfig("full", init="mup"))
    assert cfg.matrix_multiplier("lm_head") == pytest.approx(4 * 0.3)
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        export_hf(model, tmp_path / "out")
        reloaded = FalconH1ForCausalLM.from_pretrained(tmp_path / "out").eval()
        assert rel_error(reloaded(ids).logits, model(ids)) < 1e-4
        assert rel_error(import_hf(tmp_path / "out")(ids), model(ids)) < 1e-4
