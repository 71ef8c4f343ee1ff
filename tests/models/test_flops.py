"""``FalconH1LM.flops_per_token`` against torch's own FLOP counter on a real forward and backward.

``FlopCounterMode`` counts the matmuls (mm, bmm, the SDPA kernels) and convolutions that actually run - the SSD scan's
einsums included, as they are executed - and nothing element-wise, which is the convention of ``flops_per_token``.
What the counter sees differently, and how each is handled here:

- attention: the fused CPU SDPA kernel is not registered with the counter, so attention runs on the math backend,
  whose matmuls it counts (forward + backward = 3x forward, the formula's convention; flash attention's backward
  recomputes the scores and would count 3.5x);
- the depthwise convolution's backward: the counter ignores ``groups`` for the weight gradient and counts it
  ``channels`` times over (224x for the tiny model), so the backward is taken as twice the counted forward
  (input gradient + weight gradient, each the forward's size);
- learnable multipliers add a per-step (not per-token) cost; the models here have none (``lrm=none``).
"""

import dataclasses

import pytest
import torch
from runs import GROUPED_HEADS, micro_config
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lrm_train.models import FalconH1LM, preset
from lrm_train.nn import LRMConfig

# Small enough for vocabulary and MLP not to dominate: attention, every term of the scan and the convolution each
# weigh 0.9% or more of the total, above the tolerance below.
SCAN_HEAVY = {**GROUPED_HEADS, "mamba_d_state": 32, "mamba_chunk_size": 16, "mamba_rms_norm": True}


def counted_flops_per_token(model: FalconH1LM, batch: int, seq_len: int) -> float:
    ids = torch.randint(0, model.cfg.vocab_size, (batch, seq_len))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids).float().logsumexp(-1).mean().backward()
    per_op = counter.get_flop_counts()["Global"]
    conv_forward = per_op.get(torch.ops.aten.convolution, 0)
    assert conv_forward > 0 and per_op.get(torch.ops.aten.bmm, 0) > 0  # the conv and the scan/attention were seen
    total = sum(flops for op, flops in per_op.items() if op is not torch.ops.aten.convolution_backward)
    return (total + 2 * conv_forward) / (batch * seq_len)


@pytest.mark.parametrize(
    "shape,batch,seq_len,rel",
    [
        # What is left at these tolerances is the scan and convolution running a little past the sequence: the
        # across-chunk einsum over chunks + 1 states (the zero initial one), the convolution over seq_len + 3 outputs.
        ("scan_heavy", 1, 512, 5e-3),
        ("tiny", 1, 128, 1e-3),
        ("falcon_h1_0p5b_two_layers", 1, 2048, 1e-3),  # the released widths, on fake tensors (no memory, no compute)
    ],
)
def test_flops_per_token_matches_flop_counter(shape, batch, seq_len, rel):
    lrm = LRMConfig("none")
    if shape == "scan_heavy":
        model = FalconH1LM(micro_config(**SCAN_HEAVY), lrm)
        counted = counted_flops_per_token(model, batch, seq_len)
    elif shape == "tiny":
        model = FalconH1LM(preset("tiny"), lrm)
        counted = counted_flops_per_token(model, batch, seq_len)
    else:
        with FakeTensorMode():
            model = FalconH1LM(dataclasses.replace(preset("falcon_h1_0p5b"), num_hidden_layers=2), lrm)
            counted = counted_flops_per_token(model, batch, seq_len)
    # The math SDPA backend multiplies every query by every key: the non-causal count is what it executes.
    assert model.flops_per_token(seq_len, causal_attention=False) == pytest.approx(counted, rel=rel)


@pytest.mark.parametrize("seq_len", [32, 100])  # shorter than one chunk of 64, and not a multiple of it
def test_flops_per_token_counts_the_padded_chunks_the_scan_runs(seq_len):
    model = FalconH1LM(preset("tiny"), LRMConfig("none"))
    counted = counted_flops_per_token(model, 2, seq_len)
    assert model.flops_per_token(seq_len, causal_attention=False) == pytest.approx(counted, rel=1e-3)


def test_causal_attention_counts_each_query_against_the_keys_up_to_it():
    cfg = preset("falcon_h1_0p5b")
    with torch.device("meta"):  # shapes only
        model = FalconH1LM(dataclasses.replace(cfg, num_hidden_layers=2), LRMConfig("none"))
    seq_len, per_key = 4096, 3 * 2 * 4 * cfg.num_attention_heads * cfg.attention_head_dim  # 2 layers, fwd + bwd
    skipped = model.flops_per_token(seq_len, causal_attention=False) - model.flops_per_token(seq_len)
    assert skipped == pytest.approx(per_key * (seq_len - (seq_len + 1) / 2))
