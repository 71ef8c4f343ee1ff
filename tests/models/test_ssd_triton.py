"""The Triton SSD scan against the plain-PyTorch reference, run on CPU by Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before triton is first imported (tests/conftest.py sets it on machines without
CUDA); the fixture checks that the kernels really are interpreted.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from bf16_interpreter import emulate_gpu_bf16

from lrm_train.models import FalconH1LM, preset
from lrm_train.models.ssd import ssd_chunked_scan, ssd_scan_function
from lrm_train.nn import LRMConfig


def scan_inputs(batch, length, heads, head_dim, groups, d_state, dtype=torch.float32, max_decay=4.0):
    x = torch.randn(batch, length, heads, head_dim)
    dt = F.softplus(torch.randn(batch, length, heads))
    A = -torch.linspace(0.5, max_decay, heads)
    B = torch.randn(batch, length, groups, d_state)
    C = torch.randn(batch, length, groups, d_state)
    D = torch.randn(heads)
    x, B, C = (t.to(dtype) for t in (x, B, C))  # as under autocast: dt, A, D stay float32
    return [t.requires_grad_() for t in (x, dt, A, B, C, D)]


def outputs_and_grads(scan, inputs, chunk_size, dy):
    y = scan(*inputs, chunk_size)
    return y, torch.autograd.grad(y, inputs, dy)


def relative_error(got, expected):
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


NAMES = ("x", "dt", "A", "B", "C", "D")


@pytest.mark.parametrize(
    "batch, length, heads, head_dim, groups, d_state, chunk_size",
    [
        (1, 7, 2, 8, 1, 16, 16),  # shorter than one chunk, odd
        (2, 37, 4, 3, 2, 5, 16),  # 3 chunks, the last partial; 2 groups; dims below the 16-wide tiles
        (1, 32, 2, 16, 1, 80, 16),  # whole chunks; d_state over two 64-wide tiles
        (1, 30, 3, 8, 3, 8, 12),  # a chunk size that is not a power of two, a group per head
        (1, 150, 2, 4, 2, 4, 80),  # chunks of two 64-position blocks, the second one partial
    ],
)
def test_output_and_every_gradient_match_the_reference(
    ssd_triton, batch, length, heads, head_dim, groups, d_state, chunk_size
):
    inputs = scan_inputs(batch, length, heads, head_dim, groups, d_state)
    dy = torch.randn(batch, length, heads, head_dim)
    y, grads = outputs_and_grads(ssd_triton.ssd_scan, inputs, chunk_size, dy)
    y_ref, grads_ref = outputs_and_grads(ssd_chunked_scan, inputs, chunk_size, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for name, grad, grad_ref in zip(NAMES, grads, grads_ref):
        assert grad.dtype == grad_ref.dtype and grad.shape == grad_ref.shape, name
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=2e-4, msg=lambda m, name=name: f"d{name}: {m}")


def test_strong_decay_over_a_long_chunk_stays_finite_and_exact(ssd_triton):
    """exp(s_l - s_s) above the diagonal, and in the rows an 80-step chunk leaves of its two 64-position blocks,
    would overflow: it must be masked before the exp, never after."""
    inputs = scan_inputs(1, 90, 2, 4, 1, 4, max_decay=30.0)
    dy = torch.randn(1, 90, 2, 4)
    y, grads = outputs_and_grads(ssd_triton.ssd_scan, inputs, 80, dy)
    y_ref, grads_ref = outputs_and_grads(ssd_chunked_scan, inputs, 80, dy)
    assert all(torch.isfinite(t).all() for t in (y, *grads))
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=2e-4)


def test_bf16_inputs_give_bf16_outputs_close_to_the_float32_reference(ssd_triton):
    inputs = scan_inputs(1, 37, 4, 16, 2, 16, dtype=torch.bfloat16)
    dy = torch.randn(1, 37, 4, 16, dtype=torch.bfloat16)
    y, grads = outputs_and_grads(ssd_triton.ssd_scan, inputs, 16, dy)
    exact = [t.detach().float().requires_grad_() for t in inputs]
    y_ref, grads_ref = outputs_and_grads(ssd_chunked_scan, exact, 16, dy.float())
    assert y.dtype == torch.bfloat16 and [g.dtype for g in grads] == [t.dtype for t in inputs]
    assert relative_error(y, y_ref) < 1e-2
    for name, grad, grad_ref in zip(NAMES, grads, grads_ref):
        assert relative_error(grad, grad_ref) < 2e-2, name


def gpu_bf16_errors(ssd_triton, monkeypatch, inputs, dy, chunk_size):
    """The kernels with bf16 dot operands, cast and multiplied as on a GPU (the plain interpreter multiplies in
    float32): each output's and gradient's error against the float32 reference, and that of the per-head sum of ddt
    (dt_bias's gradient), in test_gpu_ssd's metric."""
    emulate_gpu_bf16(monkeypatch, ssd_triton)
    y, grads = outputs_and_grads(ssd_triton.ssd_scan, inputs, chunk_size, dy)
    exact = [t.detach().float().requires_grad_() for t in inputs]
    y_ref, grads_ref = outputs_and_grads(ssd_chunked_scan, exact, chunk_size, dy.float())
    errors = {
        "y": relative_error(y, y_ref),
        "sum of ddt": relative_error(grads[1].sum((0, 1)), grads_ref[1].sum((0, 1))),
    }
    return errors | {
        f"d{name}": relative_error(grad, grad_ref) for name, grad, grad_ref in zip(NAMES, grads, grads_ref)
    }


def gpu_like_inputs(batch, length, heads, groups, head_dim=64, d_state=128, max_decay=None):
    """test_gpu_ssd's inputs: bf16 x, B, C; A from -1 to -heads (or to -max_decay)."""
    x = torch.randn(batch, length, heads, head_dim, dtype=torch.bfloat16)
    dt = F.softplus(torch.randn(batch, length, heads) - 2.0)
    A = (
        -torch.arange(1, heads + 1, dtype=torch.float32)
        if max_decay is None
        else -torch.linspace(0.1, max_decay, heads)
    )
    B, C = (torch.randn(batch, length, groups, d_state, dtype=torch.bfloat16) for _ in range(2))
    return [t.requires_grad_() for t in (x, dt, A, B, C, torch.ones(heads))], torch.randn_like(x)


def format_errors(errors):
    return ", ".join(f"{name} {error:.1e}" for name, error in errors.items())


@pytest.mark.parametrize("batch, groups, seed", [(1, 1, 1), (2, 2, 2)])
def test_bf16_with_a_gpus_rounding_keeps_every_gradient_close_to_the_float32_reference(
    ssd_triton, monkeypatch, batch, groups, seed
):
    """At test_gpu_ssd's inputs, metric and tolerance; two chunks of 128, the second partial. dA and the per-head sum
    of ddt (dt_bias's gradient) were 3-21% and 6-14% off here while the GRAD_ROWS pass rounded its operands to bf16."""
    torch.manual_seed(seed)
    inputs, dy = gpu_like_inputs(batch, 150, 4, groups)
    errors = gpu_bf16_errors(ssd_triton, monkeypatch, inputs, dy, 128)
    assert max(errors.values()) < 2e-2, format_errors(errors)


def test_passed_states_are_the_float32_recurrence_rounded_once_to_the_inputs_dtype(ssd_triton, monkeypatch):
    """The states entering each chunk are kept in bf16 for bf16 inputs, but summed in float32 from the chunks' own
    float32 states: each is the float32 recurrence rounded to nearest once (within half a bf16 unit, 2^-8 relative),
    over 13 chunks of slow decay for the state to build up."""
    emulate_gpu_bf16(monkeypatch, ssd_triton)
    torch.manual_seed(3)
    x, dt, A, B, _, _ = (t.detach() for t in gpu_like_inputs(2, 200, 3, 1, head_dim=16, d_state=32, max_decay=0.5)[0])
    shape = ssd_triton._Shape(x, B, 16)
    s = ssd_triton._cumulative_decay(dt, A, shape)
    states = ssd_triton._entering_states(x, dt, B, s, shape)
    own = ssd_triton._chunk_outer_sums(x, B, dt, s, shape, from_end=True)
    expected = torch.zeros_like(own)
    for c in range(1, shape.chunks):
        expected[:, :, c] = torch.exp(s[:, :, c - 1, -1])[..., None, None] * expected[:, :, c - 1] + own[:, :, c - 1]
    assert own.dtype == torch.float32 and states.dtype == torch.bfloat16
    torch.testing.assert_close(states.float(), expected, rtol=2**-8, atol=1e-6 * expected.abs().max().item())


def test_bf16_states_over_many_chunks_keep_every_gradient_close_to_the_float32_reference(ssd_triton, monkeypatch):
    """Slow decay over 13 chunks (the last partial): the bf16 passed states and their gradients carry the state
    through every chunk, and every gradient stays at test_gpu_ssd's tolerance."""
    torch.manual_seed(4)
    inputs, dy = gpu_like_inputs(1, 400, 3, 1, head_dim=32, d_state=32, max_decay=0.5)
    errors = gpu_bf16_errors(ssd_triton, monkeypatch, inputs, dy, 32)
    assert max(errors.values()) < 2e-2, format_errors(errors)


def test_group_scores_are_c_times_b_of_each_chunk_and_group_at_and_below_the_diagonal(ssd_triton):
    """C.B^T, computed once per (batch, group, chunk) for all the group's heads: every block at or below a chunk's
    diagonal (chunks of two 64-position blocks, the last chunk partial), zero past the sequence's end."""
    length, chunk_size, groups = 150, 80, 2
    _, _, _, B, C, _ = (t.detach() for t in scan_inputs(2, length, 6, 4, groups, 24))
    shape = ssd_triton._Shape(torch.empty(2, length, 6, 4), B, chunk_size)
    scores = ssd_triton._group_scores(C, B, shape)

    padded = [F.pad(t, (0, 0, 0, 0, 0, 2 * chunk_size - length)).unflatten(1, (2, chunk_size)) for t in (C, B)]
    expected = torch.einsum("bclgn,bcsgn->bgcls", *padded)
    block = torch.arange(chunk_size) // 64
    read = block[:, None] >= block[None, :]  # the blocks (m, k) of 64 rows and columns with k <= m
    assert scores.shape == expected.shape
    torch.testing.assert_close(scores[..., read], expected[..., read], rtol=1e-5, atol=1e-5)
    past_end = torch.arange(chunk_size) >= length - chunk_size  # of the last chunk
    assert (scores[:, :, -1][..., read & (past_end[:, None] | past_end[None, :])] == 0).all()


@pytest.mark.parametrize("heads, groups", [(6, 2), (3, 1)])
def test_heads_sharing_their_groups_scores_match_the_reference_in_bf16(ssd_triton, monkeypatch, heads, groups):
    """Several heads per group read one C.B^T: each head's output and gradients, and B's and C's summed over the
    heads, at test_gpu_ssd's tolerance with a GPU's bf16 rounding."""
    monkeypatch.setattr(ssd_triton, "BC_GRAD_HEADS", 2)  # and B's and C's gradients summed over shares of heads
    torch.manual_seed(5)
    inputs, dy = gpu_like_inputs(1, 200, heads, groups, head_dim=16, d_state=32)
    errors = gpu_bf16_errors(ssd_triton, monkeypatch, inputs, dy, 128)
    assert max(errors.values()) < 2e-2, format_errors(errors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_d_gradient_summed_by_the_backward_x_kernel_matches_the_reference(ssd_triton, dtype):
    """dD = sum dy . x, added up per block of positions inside backward_x: over two 64-position blocks per chunk, a
    partial last chunk, and x and dy laid out position-fastest as the model's transposed convolution output."""
    batch, length, heads, head_dim = 2, 150, 3, 8
    x = torch.randn(batch, heads, head_dim, length).permute(0, 3, 1, 2).to(dtype)
    dy = torch.randn(batch, heads, head_dim, length).permute(0, 3, 1, 2).to(dtype)
    _, dt, A, B, C, D = (t.detach() for t in scan_inputs(batch, length, heads, head_dim, 1, 8, dtype))
    inputs = [t.requires_grad_() for t in (x, dt, A, B, C, D)]
    (dD,) = torch.autograd.grad(ssd_triton.ssd_scan(*inputs, 80), D, dy)
    expected = (dy.float() * x.detach().float()).sum((0, 1, 3))
    assert dD.dtype == D.dtype
    torch.testing.assert_close(dD, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads, groups", [(6, 2), (5, 1)])
def test_b_and_c_gradients_summed_over_shares_of_the_heads_match_the_reference(ssd_triton, monkeypatch, heads, groups):
    """dB and dC from programs that each take at most 2 of a group's heads (shares of 2 and 1, or 2, 2 and 1), added
    up afterwards: as from one program per group up to float32 summation order, and as the reference."""
    inputs = scan_inputs(2, 70, heads, 8, groups, 24)
    dy = torch.randn(2, 70, heads, 8)
    in_one_share = outputs_and_grads(ssd_triton.ssd_scan, inputs, 64, dy)[1][3:5]
    monkeypatch.setattr(ssd_triton, "BC_GRAD_HEADS", 2)
    shape = ssd_triton._Shape(inputs[0], inputs[3], 64)
    assert (shape.head_shares, shape.heads_per_share) == ((2, 2) if heads == 6 else (3, 2))
    in_shares = outputs_and_grads(ssd_triton.ssd_scan, inputs, 64, dy)[1][3:5]
    reference = outputs_and_grads(ssd_chunked_scan, inputs, 64, dy)[1][3:5]
    for name, grad, grad_in_one, grad_ref in zip("BC", in_shares, in_one_share, reference):
        torch.testing.assert_close(grad, grad_in_one, rtol=1e-6, atol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=2e-4, msg=lambda m, name=name: f"d{name}: {m}")


def test_chunks_of_256_give_what_chunks_of_64_and_128_give(ssd_triton):
    """The chunk size changes how the scan is split, not what it computes: chunks of 256 (four 64-position blocks, the
    second chunk partial) against the reference and the kernels' own chunks of 64 and 128, each tensor's largest error
    over its largest value (test_gpu_ssd's metric). Element by element the small dA of a fast-decaying head is off by
    up to 1e-3 in float32 at chunk 256 (2e-4 at 64): exp(s_l - s_s) is taken from cumulative log decays that grow
    with the chunk, and dA sums row and column terms that cancel."""
    inputs = scan_inputs(1, 300, 2, 8, 1, 16)
    dy = torch.randn(1, 300, 2, 8)
    outputs = {size: outputs_and_grads(ssd_triton.ssd_scan, inputs, size, dy) for size in (64, 128, 256)}
    y_ref, grads_ref = outputs_and_grads(ssd_chunked_scan, inputs, 256, dy)
    y, grads = outputs[256]
    for expected_y, expected_grads in (y_ref, grads_ref), outputs[64], outputs[128]:
        errors = {"y": relative_error(y, expected_y)}
        errors |= {f"d{name}": relative_error(got, want) for name, got, want in zip(NAMES, grads, expected_grads)}
        assert max(errors.values()) < 1e-4, format_errors(errors)


def test_chunks_of_256_with_a_gpus_bf16_rounding_keep_every_gradient_close(ssd_triton, monkeypatch):
    """Chunks of 256 (the second partial) with bf16 operands as on a GPU, at test_gpu_ssd's tolerance."""
    torch.manual_seed(6)
    inputs, dy = gpu_like_inputs(1, 300, 2, 1, head_dim=16, d_state=32)
    errors = gpu_bf16_errors(ssd_triton, monkeypatch, inputs, dy, 256)
    assert max(errors.values()) < 2e-2, format_errors(errors)


def test_fake_kernel_and_autograd_registration_pass_opcheck(ssd_triton):
    inputs = scan_inputs(1, 5, 2, 4, 1, 4)
    torch.library.opcheck(
        ssd_triton.ssd_scan, (*inputs, 4), test_utils=("test_schema", "test_faketensor", "test_autograd_registration")
    )


def test_torch_compile_sees_one_op_without_graph_breaks(ssd_triton):
    inputs = scan_inputs(1, 9, 2, 4, 1, 4)
    compiled = torch.compile(ssd_triton.ssd_scan, backend="aot_eager", fullgraph=True)
    dy = torch.randn(1, 9, 2, 4)
    y, grads = outputs_and_grads(compiled, inputs, 4, dy)
    y_ref, grads_ref = outputs_and_grads(ssd_chunked_scan, inputs, 4, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=2e-4)


def test_cpu_tensors_without_the_interpreter_are_refused_in_one_line(ssd_triton, monkeypatch):
    monkeypatch.setattr(ssd_triton, "INTERPRETED", False)
    with pytest.raises(ValueError, match=r"^model.ssd_backend=triton runs on CUDA tensors, got cpu ones"):
        ssd_triton.ssd_scan(*scan_inputs(1, 5, 2, 4, 1, 4), 4)


def test_the_tiny_model_gives_the_same_loss_and_gradients_with_either_backend(ssd_triton):
    assert ssd_scan_function("triton") is ssd_triton.ssd_scan
    # The tiny preset's multipliers at a smaller shape: the interpreter runs every kernel instance in Python.
    cfg = dataclasses.replace(
        preset("tiny"),
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=1,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        mamba_d_ssm=32,
        mamba_n_heads=2,
        mamba_d_head=16,
        mamba_chunk_size=8,
    )
    ids = torch.randint(0, cfg.vocab_size, (1, 14))  # 13 positions: one whole chunk and a partial one
    losses, grads = {}, {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = FalconH1LM(dataclasses.replace(cfg, ssd_backend=backend), LRMConfig("full"))
        logits = model(ids[:, :-1])
        losses[backend] = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        losses[backend].backward()
        grads[backend] = {name: p.grad for name, p in model.named_parameters()}
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-5, atol=1e-5)
    assert grads["triton"].keys() == grads["torch"].keys()
    for name, grad in grads["torch"].items():
        torch.testing.assert_close(grads["triton"][name], grad, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
