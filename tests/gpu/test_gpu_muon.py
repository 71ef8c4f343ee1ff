"""Muon on CUDA is torch.optim.Muon bit for bit.

torch.optim.Muon always runs Newton-Schulz in bf16, so the equality also shows that ours, with ``ns_dtype`` left at
``auto``, runs it in bf16 on CUDA (float32 gives other bits).
"""

import pytest
import torch
from cuda_runs import GPU

from lrm_train.optim import Muon

pytestmark = GPU

# Square, wide and tall, small and large enough for cuBLAS to pick other kernels.
SHAPES = [(16, 24), (24, 8), (256, 256), (1024, 384), (384, 1536)]


def run_both(steps: int = 3, **settings):
    weights = [torch.randn(s, device="cuda") for s in SHAPES]
    ours = [torch.nn.Parameter(w.clone()) for w in weights]
    theirs = [torch.nn.Parameter(w.clone()) for w in weights]
    adjust = settings.pop("adjust_lr")
    opt_ours = Muon(ours, adjust_lr=adjust, **settings)  # ns_dtype left at auto
    opt_theirs = torch.optim.Muon(theirs, adjust_lr_fn=adjust, **settings)
    for _ in range(steps):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt_ours.step()
        opt_theirs.step()
    return ours, theirs, weights


@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_cuda_update_matches_torch_muon(adjust, nesterov):
    ours, theirs, initial = run_both(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr=adjust)
    for a, b, w in zip(ours, theirs, initial):
        assert a.device.type == "cuda"
        assert not torch.equal(a, w)  # it moved
        torch.testing.assert_close(a, b, rtol=0, atol=0)
