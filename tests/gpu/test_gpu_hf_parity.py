"""HF parity in bf16 on CUDA: our model under bf16 autocast against transformers' FalconH1ForCausalLM in bf16.

Neither is exact: transformers in bf16 holds bf16 weights and runs its scan in bf16; ours keeps float32 weights and
runs the matmuls and the Triton SSD scan's dot operands in bf16 (its accumulations and states in float32). So both
are compared with the float32 reference too.
Tolerances (relative L2 error of the logits): ours vs transformers' bf16 < 3e-2, ours vs float32 < 2e-2 and no worse
than twice transformers' own bf16 error. Measured with CPU bf16 at these shapes: 0.8%, 0.4% and 0.57x.
"""

import pytest
import torch
from cuda_runs import GPU
from transformers import FalconH1Config as HFConfig
from transformers import FalconH1ForCausalLM

from lrm_train.hf import import_hf
from lrm_train.nn import LRMConfig

pytestmark = GPU

# fmt: off
NON_DEFAULT_MULTIPLIERS = dict(
    embedding_multiplier=2.5, lm_head_multiplier=0.3, key_multiplier=0.4, attention_in_multiplier=1.3,
    attention_out_multiplier=0.7, ssm_in_multiplier=1.25, ssm_out_multiplier=0.8,
    ssm_multipliers=[0.35, 0.25, 0.6, 0.5, 0.9], mlp_multipliers=[0.88, 0.59],
)
SHAPES = {
    "mha_one_group": dict(num_attention_heads=4, num_key_value_heads=4, mamba_n_groups=1, mamba_rms_norm=False),
    "gqa_two_groups_norm": dict(num_attention_heads=4, num_key_value_heads=2, mamba_n_groups=2, mamba_rms_norm=True),
}
# fmt: on
VOCAB = 97


def saved_hf_model(folder, shape: str) -> None:
    # fmt: off
    config = HFConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16, mamba_d_ssm=64,
        mamba_n_heads=8, mamba_d_head=8, mamba_d_state=16, mamba_chunk_size=16,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4}, **NON_DEFAULT_MULTIPLIERS, **SHAPES[shape],
    )
    # fmt: on
    model = FalconH1ForCausalLM(config)
    with torch.no_grad():  # random values everywhere, norms and SSM vectors included
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("placement", ["none", "full"])
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_logits_match_transformers_in_bf16(tmp_path, shape, placement):
    saved_hf_model(tmp_path, shape)
    ours = import_hf(tmp_path, LRMConfig(placement)).cuda().eval()
    exact = FalconH1ForCausalLM.from_pretrained(tmp_path).cuda().eval()
    theirs_bf16 = FalconH1ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(0, VOCAB, (2, 64), device="cuda")  # four chunks of the scan
    with torch.no_grad():
        reference = exact(ids).logits
        theirs = theirs_bf16(ids).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = ours(ids)
    assert theirs.dtype == torch.bfloat16 and logits.dtype == torch.bfloat16  # both really ran in bf16
    assert rel_error(logits, theirs) < 3e-2
    ours_error, theirs_error = rel_error(logits, reference), rel_error(theirs, reference)
    assert 0 < ours_error < 2e-2 and ours_error < 2 * theirs_error
