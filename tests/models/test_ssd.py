import pytest
import torch

from lrm_train.models.ssd import ssd_chunked_scan


def recurrent_scan(x, dt, A, B, C, D):
    """The Mamba2 recurrence one step at a time (float64): the definition the chunked scan must match."""
    batch, length, heads, head_dim = x.shape
    per_group = heads // B.shape[2]
    B, C = B.repeat_interleave(per_group, dim=2), C.repeat_interleave(per_group, dim=2)
    state = x.new_zeros(batch, heads, head_dim, B.shape[-1])
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((state * C[:, t, :, None, :]).sum(-1) + D[:, None] * x[:, t])
    return torch.stack(ys, dim=1)


def random_inputs(batch, length, heads, head_dim, groups, d_state, dtype=torch.float64):
    x = torch.randn(batch, length, heads, head_dim, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(batch, length, heads, dtype=dtype))
    A = -torch.linspace(0.5, 8.0, heads, dtype=dtype)
    B = torch.randn(batch, length, groups, d_state, dtype=dtype)
    C = torch.randn(batch, length, groups, d_state, dtype=dtype)
    D = torch.randn(heads, dtype=dtype)
    return x, dt, A, B, C, D


@pytest.mark.parametrize("length", [1, 7, 8, 9, 23, 40])
@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_scan_matches_the_recurrence(length, groups):
    inputs = random_inputs(2, length, 4, 3, groups, 5)
    expected = recurrent_scan(*inputs)
    got = ssd_chunked_scan(*inputs, chunk_size=8)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_chunk_size_does_not_change_the_result():
    inputs = random_inputs(1, 37, 4, 8, 2, 6, dtype=torch.float32)
    reference = ssd_chunked_scan(*inputs, chunk_size=37)
    for chunk in (1, 4, 16, 64):
        torch.testing.assert_close(ssd_chunked_scan(*inputs, chunk_size=chunk), reference, rtol=1e-4, atol=1e-4)


def test_strong_decay_over_long_chunks_stays_finite_and_exact():
    x, dt, A, B, C, D = random_inputs(1, 256, 2, 4, 1, 4)
    A = torch.tensor([-30.0, -0.01], dtype=torch.float64)
    got = ssd_chunked_scan(x, dt, A, B, C, D, chunk_size=128)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), recurrent_scan(x, dt, A, B, C, D), rtol=1e-4, atol=1e-4)
