"""The compiled Triton SSD scan on CUDA against the plain-PyTorch reference, at the 0.5B model's scan shape.

The CPU tests (tests/models/test_ssd_triton.py) run the same kernels in Triton's interpreter, which neither compiles
them (tile sizes, shared memory) nor multiplies bf16 on tensor cores: that is what these check.
"""

import pytest
import torch
import torch.nn.functional as F
from cuda_runs import GPU

from lrm_train.models.ssd import ssd_chunked_scan, ssd_scan_function

pytestmark = GPU


def scan_inputs(length, heads, groups, dtype, batch=2, head_dim=64, d_state=128):
    x = torch.randn(batch, length, heads, head_dim, device="cuda", dtype=dtype)
    dt = F.softplus(torch.randn(batch, length, heads, device="cuda") - 2.0)
    A = -torch.arange(1, heads + 1, device="cuda", dtype=torch.float32)
    B = torch.randn(batch, length, groups, d_state, device="cuda", dtype=dtype)
    C = torch.randn(batch, length, groups, d_state, device="cuda", dtype=dtype)
    D = torch.ones(heads, device="cuda")
    return [t.requires_grad_() for t in (x, dt, A, B, C, D)]


def relative_error(got, expected):
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.mark.parametrize("chunk_size", [128, 256])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("length, heads, groups", [(1000, 24, 1), (333, 8, 2)])
def test_triton_scan_matches_the_reference_on_cuda(dtype, tolerance, length, heads, groups, chunk_size):
    """With 24 heads in one group, all 24 read one C.B^T and dB and dC add up three shares of 8 heads; chunks of 256
    compute the same scan as chunks of 128."""
    scan = ssd_scan_function("auto")
    assert scan is not ssd_chunked_scan
    inputs = scan_inputs(length, heads, groups, dtype)
    exact = [t.detach().float().requires_grad_() for t in inputs]
    dy = torch.randn_like(inputs[0])
    y = scan(*inputs, chunk_size)
    y_ref = ssd_chunked_scan(*exact, chunk_size)
    grads = torch.autograd.grad(y, inputs, dy)
    grads_ref = torch.autograd.grad(y_ref, exact, dy.float())
    assert y.dtype == dtype and relative_error(y, y_ref) < tolerance
    for name, grad, grad_ref in zip(("x", "dt", "A", "B", "C", "D"), grads, grads_ref):
        assert relative_error(grad, grad_ref) < tolerance, name
