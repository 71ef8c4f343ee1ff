"""The Triton SSD scan against the plain-PyTorch reference, run on CPU by Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before triton is first imported (tests/conftest.py sets it on machines without
CUDA); the fixture checks that the kernels really are interpreted.
"""

import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F
from bf16_interpreter import emulate_gpu_bf16

from lrm_train.models import FalconH1LM, preset
from lrm_train.models.ssd import ssd_chunked_scan, ssd_scan_function
from lrm_train.nn import LRMConfig


@pytest.fixture(scope="module")
def ssd_triton():
    module = importlib.import_module("lrm_train.models.ssd_triton")
    if not module.INTERPRETED:
        if torch.cuda.is_available():
            pytest.skip("interpreter tests; on CUDA, tests/gpu/test_gpu_ssd.py runs the compiled kernels")
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it)")
    return module


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


@pytest.mark.parametrize("batch, groups, seed", [(1, 1, 1), (2, 2, 2)])
def test_bf16_with_a_gpus_rounding_keeps_every_gradient_close_to_the_float32_reference(
    ssd_triton, monkeypatch, batch, groups, seed
):
    """The kernels with bf16 dot operands, cast and multiplied as on a GPU (the plain interpreter multiplies in
    float32), at test_gpu_ssd's inputs, metric and tolerance; two chunks of 128, the second partial. dA and the
    per-head sum of ddt (dt_bias's gradient) were 3-21% and 6-14% off here while the GRAD_ROWS pass rounded its
    operands to bf16."""
    emulate_gpu_bf16(monkeypatch, ssd_triton)
    torch.manual_seed(seed)
    length, heads = 150, 4
    x = torch.randn(batch, length, heads, 64, dtype=torch.bfloat16)
    dt = F.softplus(torch.randn(batch, length, heads) - 2.0)
    A = -torch.arange(1, heads + 1, dtype=torch.float32)
    B, C = (torch.randn(batch, length, groups, 128, dtype=torch.bfloat16) for _ in range(2))
    inputs = [t.requires_grad_() for t in (x, dt, A, B, C, torch.ones(heads))]
    dy = torch.randn_like(x)
    y, grads = outputs_and_grads(ssd_triton.ssd_scan, inputs, 128, dy)
    exact = [t.detach().float().requires_grad_() for t in inputs]
    y_ref, grads_ref = outputs_and_grads(ssd_chunked_scan, exact, 128, dy.float())
    errors = {
        "y": relative_error(y, y_ref),
        "sum of ddt": relative_error(grads[1].sum((0, 1)), grads_ref[1].sum((0, 1))),
    }
    errors |= {f"d{name}": relative_error(grad, grad_ref) for name, grad, grad_ref in zip(NAMES, grads, grads_ref)}
    assert max(errors.values()) < 2e-2, ", ".join(f"{name} {error:.1e}" for name, error in errors.items())


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
