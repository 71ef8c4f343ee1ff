"""The presets have the shapes they claim: Falcon-H1-0.5B as released, and every preset as transformers builds it."""

from dataclasses import replace

import pytest
import torch
from transformers import FalconH1Config as HFConfig
from transformers import FalconH1ForCausalLM

from lrm_train.models import PRESETS, FalconH1LM, preset, width_family
from lrm_train.nn import LRMConfig

# Falcon-H1-0.5B as released (/work/shared/spec/falcon_h1.md: the Hugging Face config of the paper's model).
# fmt: off
RELEASED_0P5B = dict(
    vocab_size=32784, hidden_size=1024, num_hidden_layers=36, intermediate_size=2048,
    num_attention_heads=8, num_key_value_heads=2, attention_head_dim=64,
    mamba_d_ssm=1536, mamba_n_heads=24, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128, mamba_d_conv=4,
    mamba_chunk_size=128, mamba_rms_norm=False, rope_theta=1e11, rms_norm_eps=1e-5,
    embedding_multiplier=5.656854, lm_head_multiplier=0.0390625, key_multiplier=0.390625,
    attention_in_multiplier=1.0, attention_out_multiplier=0.9375, ssm_in_multiplier=1.25,
    ssm_out_multiplier=0.235702, ssm_multipliers=[0.353553, 0.25, 0.353553, 0.5, 0.353553],
    mlp_multipliers=[0.883883, 0.5859375],
)
# fmt: on

# The fields both configs share, under the same names.
SHAPE_FIELDS = [
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "mamba_d_ssm",
    "mamba_n_heads",
    "mamba_d_head",
    "mamba_n_groups",
    "mamba_d_state",
    "mamba_d_conv",
    "mamba_chunk_size",
    "mamba_rms_norm",
]


def test_falcon_h1_0p5b_is_the_released_model():
    cfg = preset("falcon_h1_0p5b")
    assert {name: getattr(cfg, name) for name in RELEASED_0P5B} == RELEASED_0P5B
    with torch.device("meta"):
        model = FalconH1LM(cfg, LRMConfig("none"))
    d, vocab, attention, ssm, bc = 1024, 32784, 8 * 64, 1536, 128
    per_layer = (
        2 * d * attention + 2 * d * 2 * 64  # q, o; k, v (2 KV heads)
        + d * (2 * ssm + 2 * bc + 24) + ssm * d  # in_proj (z, x, B, C, dt) and out_proj
        + (ssm + 2 * bc) * (4 + 1) + 3 * 24  # depthwise conv weight and bias; dt_bias, A_log, D
        + 3 * d * 2048  # gate, up, down
        + 2 * d  # the two RMSNorms
    )  # fmt: skip
    assert model.num_params() == 2 * vocab * d + 36 * per_layer + d == 521_411_104


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_has_the_parameters_transformers_gives_its_shape(name):
    cfg = preset(name)
    with torch.device("meta"):  # shapes only: width_8192 has 9.6B parameters
        ours = FalconH1LM(cfg, LRMConfig("none"))
        theirs = FalconH1ForCausalLM(HFConfig(**{f: getattr(cfg, f) for f in SHAPE_FIELDS}, tie_word_embeddings=False))
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters())
    assert ours.num_params() > ours.num_params(exclude_embedding=True) > 0


@pytest.mark.parametrize("width", [2**k for k in range(7, 14)])
def test_width_family_keeps_the_0p5b_proportions_and_fixes_what_muP_needs_fixed(width):
    """As documented: heads of 64, attention width d/2, MLP 2d, SSM 1.5d, 12 layers; the GQA ratio, d_state, the SSM
    groups and the decay rates' range the same at every width; the 0.5B model's multipliers, read at width 1024."""
    cfg, released = preset(f"width_{width}"), preset("falcon_h1_0p5b")
    heads = width // 128
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (width, 12, 8192)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attention_head_dim) == (heads, heads, 64)
    assert (cfg.intermediate_size, cfg.mamba_d_ssm, cfg.mamba_d_head) == (2 * width, 3 * width // 2, 64)
    assert cfg.mamba_n_heads * cfg.mamba_d_head == cfg.mamba_d_ssm
    assert (cfg.mamba_d_state, cfg.mamba_n_groups, cfg.mamba_a_init_range) == (128, 1, [1.0, 16.0])
    assert (cfg.parametrization, cfg.base_width) == ("mup", 1024)
    assert cfg.forward_multipliers() == released.forward_multipliers()
    with torch.device("meta"):
        decay = FalconH1LM(cfg, LRMConfig("none")).layers[0].mamba.A_log
    assert decay.shape == (cfg.mamba_n_heads,)
    a = FalconH1LM(width_family(256, 1, head_dim=32), LRMConfig("none")).layers[0].mamba.A_log.exp()
    assert (a.min().item(), a.max().item()) == pytest.approx((1.0, 16.0))  # the range, whatever the head count


def test_width_family_refuses_a_gqa_ratio_its_heads_cannot_hold():
    with pytest.raises(ValueError, match="width 256 has 2 attention heads of 64: not a multiple of queries_per_kv=4"):
        width_family(256, queries_per_kv=4)


def test_tiny_is_small_and_a_mup_transfer_of_the_0p5b_model():
    cfg = preset("tiny")
    assert cfg.forward_multipliers() == preset("falcon_h1_0p5b").forward_multipliers()  # read at width 1024 ...
    assert (cfg.parametrization, cfg.base_width) == ("mup", 1024)
    assert cfg.matrix_multiplier("lm_head") == 0.3125  # ... and applied at 128: the LM head's x 1024/128
    assert FalconH1LM(cfg, LRMConfig("none")).num_params() == 3_007_048  # "3M parameters, trains on 2 CPU cores"


@pytest.mark.parametrize("name", ["tiny", "width_256"])
def test_a_mup_transfer_starts_its_readouts_at_zero_and_the_released_model_does_not(name):
    """muP's zero readout init: the LM head and the scan's C (its query) start at zero; B, its key, and every other
    matrix as drawn; under the standard parametrization (the released model, the paper's width sweep) nothing is."""
    torch.manual_seed(0)
    model = FalconH1LM(preset(name), LRMConfig("none"))
    mixer = model.layers[0].mamba.in_proj
    assert not model.lm_head.weight.any() and not mixer["C"].weight.any()
    assert mixer["B"].weight.std() > 0 and model.layers[0].mamba.out_proj.weight.std() > 0
    assert not width_family(256, parametrization="standard").zero_init_readouts
    assert not preset("falcon_h1_0p5b").zero_init_readouts
    # An init choice, not part of the function: a checkpoint of one loads into the other.
    assert preset(name).function_definition() == replace(preset(name), zero_init_readouts=False).function_definition()


def test_an_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown model preset 'huge'; known: tiny, falcon_h1_0p5b, width_128"):
        preset("huge")
