"""The fused Triton cross-entropy of the LM head against the PyTorch path, run on CPU by Triton's interpreter, and
``model.lm_loss_backend``, which chooses between them.

``TRITON_INTERPRET=1`` must be set before triton is first imported (tests/conftest.py sets it on machines without
CUDA); its fixture checks that the kernel really is interpreted.
"""

import dataclasses
import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lrm_train.models import FalconH1LM, preset
from lrm_train.models.config import RUNTIME_FIELDS
from lrm_train.models.io import save_model
from lrm_train.nn import LRMConfig, lm_loss
from lrm_train.nn import loss as loss_module
from lrm_train.nn.loss import LMHead, linear_lm_loss, lm_loss_function, torch_chunk_loss
from lrm_train.train.config import RunConfig, validate
from tests.nn.test_loss import HIDDEN, VOCAB, inputs  # the PyTorch path's own test inputs

BLOCK_V = 16  # vocabulary blocks of the tests: 50 columns are 3 full blocks and a partial one


def _load_bf16_interpreter():
    path = Path(__file__).parents[1] / "models" / "bf16_interpreter.py"
    spec = importlib.util.spec_from_file_location("bf16_interpreter", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def kernel(cross_entropy_triton, monkeypatch):
    """Small blocks and chunks, so that the tests' rows span several blocks and their tokens several chunks."""
    monkeypatch.setattr(cross_entropy_triton, "MAX_BLOCK_V", BLOCK_V)
    monkeypatch.setattr(loss_module, "MIN_CHUNK_ELEMENTS", 1)  # 30 tokens in chunks of 8
    return cross_entropy_triton


@pytest.fixture
def gpu_bf16(monkeypatch):
    """The interpreter's float32 -> bf16 stores round to nearest even, as a GPU's do (the kernel does no dot, so only
    that patch of ``emulate_gpu_bf16`` matters: the namespace stands for a module whose dots it would switch)."""
    _load_bf16_interpreter().emulate_gpu_bf16(monkeypatch, types.SimpleNamespace(INTERPRETER_HALF_DOTS=False))


def chunk_inputs(dtype, seed=0):
    """13 rows of logits large enough that a wrong running maximum or rescaling shows; the maximum of row 0 in the
    partial last block, of row 1 in the first."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(13, VOCAB, generator=generator) * 6
    logits[0, -1] = 40.0
    logits[1, 0] = 40.0
    targets = torch.randint(0, VOCAB, (13,), generator=generator)
    targets[1] = VOCAB - 1  # in the partial block
    share = torch.rand(13, generator=generator) / 13
    share[[3, 7]] = 0.0  # ignored positions: their (clamped) target is 0
    targets[[3, 7]] = 0
    return logits.to(dtype), targets, share


@pytest.mark.parametrize("z_loss_weight", [0.0, 0.1])
def test_the_kernel_gives_log_z_the_target_logit_and_the_gradient_in_place(kernel, z_loss_weight):
    logits, targets, share = chunk_inputs(torch.float32)
    expected = torch_chunk_loss(logits.clone(), targets, share, z_loss_weight, True)
    buffer = logits.clone()
    got = kernel.cross_entropy_chunk_(buffer, targets, share, z_loss_weight, True)
    assert got[2] is buffer  # the gradient overwrote the logits
    for value, reference in zip(got, expected):
        torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], torch.logsumexp(logits, -1))
    assert got[2][[3, 7]].abs().max() == 0
    # Each valid row's gradient sums to share * 2 w log Z: the softmax part minus the one-hot part.
    torch.testing.assert_close(got[2].sum(-1), share * 2 * z_loss_weight * got[0], rtol=1e-4, atol=1e-6)


def test_at_the_05b_vocabulary_with_the_default_blocks(cross_entropy_triton):
    """32784 = 4 x 8192 + 16 columns: the last block is nearly all mask."""
    vocab = 32784
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, vocab, generator=generator) * 3
    logits[0, -1] = 30.0  # the maximum in the 16-column block
    targets = torch.randint(0, vocab, (8,), generator=generator)
    targets[0] = vocab - 1
    share = torch.full((8,), 1 / 8)
    expected = torch_chunk_loss(logits.clone(), targets, share, 1e-4, True)
    got = cross_entropy_triton.cross_entropy_chunk_(logits, targets, share, 1e-4, True)
    for value, reference in zip(got, expected):
        torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-7)


def test_without_grad_the_kernel_leaves_the_logits_alone(kernel):
    logits, targets, share = chunk_inputs(torch.float32)
    buffer = logits.clone()
    log_z, target_logits, grad = kernel.cross_entropy_chunk_(buffer, targets, share, 0.1, False)
    assert grad is None and torch.equal(buffer, logits)
    torch.testing.assert_close(log_z, torch.logsumexp(logits, -1))
    torch.testing.assert_close(target_logits, logits.gather(-1, targets[:, None]).squeeze(-1))


def test_in_bf16_the_kernel_writes_the_torch_paths_gradient_to_a_rounding(kernel, gpu_bf16):
    logits, targets, share = chunk_inputs(torch.bfloat16)
    expected = torch_chunk_loss(logits.clone(), targets, share, 0.1, True)
    got = kernel.cross_entropy_chunk_(logits.clone(), targets, share, 0.1, True)
    assert got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)  # float32 statistics of the bf16 logits
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    # Both round float32 values that differ by float32 rounding: at most one bf16 step apart.
    torch.testing.assert_close(got[2], expected[2], rtol=2**-7, atol=1e-6)


def both_paths(hidden, weight, targets, z_loss_weight, **kwargs):
    """(LMLoss, (grad hidden, grad weight)) of the torch path, then of the Triton one."""
    out = []
    for chunk_loss in (torch_chunk_loss, lm_loss_function("triton")):
        got = linear_lm_loss(hidden, weight, targets, z_loss_weight, chunk_loss=chunk_loss, **kwargs)
        out.append((got, torch.autograd.grad(got.loss * 3, (hidden, weight))))
    return out


@pytest.mark.parametrize("z_loss_weight", [0.0, 0.1])
def test_linear_lm_loss_through_the_kernel_equals_the_torch_path(kernel, z_loss_weight):
    hidden, weight, targets = inputs()
    (expected, expected_grads), (got, grads) = both_paths(hidden, weight, targets, z_loss_weight)
    for value, reference in zip(got, expected):
        torch.testing.assert_close(value, reference.detach())
    for grad, reference in zip(grads, expected_grads):
        torch.testing.assert_close(grad, reference)
    assert grads[0][0, :4].abs().max() == 0 and grads[0][2, 9].abs().max() == 0
    reference = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(got.cross_entropy, reference)
    if z_loss_weight:
        torch.testing.assert_close(got.z_loss, lm_loss(hidden @ weight.T, targets).z_loss)


def test_an_ignore_index_inside_the_vocabulary_gets_no_gradient(kernel):
    hidden, weight, targets = inputs(1)
    targets[targets == -100] = 7
    (expected, expected_grads), (got, grads) = both_paths(hidden, weight, targets, 0.1, ignore_index=7)
    for value, reference in zip(got, expected):
        torch.testing.assert_close(value, reference.detach())
    for grad, reference in zip(grads, expected_grads):
        torch.testing.assert_close(grad, reference)
    assert grads[0][targets == 7].abs().max() == 0


def test_under_bf16_autocast_the_kernel_matches_the_torch_path(kernel, gpu_bf16):
    hidden, weight, targets = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (expected, expected_grads), (got, grads) = both_paths(hidden, weight, targets, 0.1)
    torch.testing.assert_close(got.loss, expected.loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.z_loss, expected.z_loss, rtol=1e-5, atol=1e-5)
    for grad, reference in zip(grads, expected_grads):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, reference, rtol=1e-2, atol=1e-3)


def test_a_model_built_with_the_triton_backend_computes_the_same_loss(kernel):
    cfg = dataclasses.replace(preset("tiny"), vocab_size=VOCAB, num_hidden_layers=1)
    torch.manual_seed(0)
    reference = FalconH1LM(dataclasses.replace(cfg, lm_loss_backend="torch"), LRMConfig("full"))
    model = FalconH1LM(dataclasses.replace(cfg, lm_loss_backend="triton"), LRMConfig("full"))
    model.load_state_dict(reference.state_dict())
    assert reference.lm_head.chunk_loss is torch_chunk_loss
    assert model.lm_head.chunk_loss is kernel.cross_entropy_chunk_
    ids = torch.randint(0, VOCAB, (2, 9))
    targets = ids[:, 1:].clone()
    targets[0, :2] = -100
    results = []
    for m in (reference, model):
        out = m(ids[:, :-1], targets, 0.01)
        out.loss.backward()
        results.append((out, {name: p.grad for name, p in m.named_parameters()}))
    (expected, expected_grads), (got, grads) = results
    for value, reference_value in zip(got, expected):
        torch.testing.assert_close(value, reference_value.detach())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], msg=name)


def test_the_kernel_refuses_cpu_tensors_when_compiled(kernel, monkeypatch):
    monkeypatch.setattr(kernel, "INTERPRETED", False)
    logits, targets, share = chunk_inputs(torch.float32)
    with pytest.raises(ValueError, match=r"^model.lm_loss_backend=triton runs on CUDA tensors, got cpu ones"):
        kernel.cross_entropy_chunk_(logits, targets, share, 0.0, True)


def test_an_unknown_backend_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"^model.lm_loss_backend='cuda' must be one of torch, triton, auto$"):
        dataclasses.replace(preset("tiny"), lm_loss_backend="cuda")
    with pytest.raises(ValueError, match=r"^model.lm_loss_backend='cuda' must be one of torch, triton, auto$"):
        lm_loss_function("cuda")


def test_auto_picks_the_torch_path_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert lm_loss_function("auto") is torch_chunk_loss
    assert LMHead(HIDDEN, VOCAB).chunk_loss is torch_chunk_loss


def test_auto_with_cuda_runs_triton_on_cuda_tensors_only(monkeypatch):
    """Heads are built before the model moves: the choice follows the logits' device."""

    def cuda_only(*args):
        raise AssertionError("the Triton path ran on CPU tensors")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loss_module, "_triton_chunk_loss", lambda: cuda_only)
    chunk_loss = lm_loss_function("auto")
    assert chunk_loss.args == (cuda_only, torch_chunk_loss)  # what it runs on CUDA tensors, and elsewhere
    logits, targets, share = chunk_inputs(torch.float32)
    expected = torch_chunk_loss(logits.clone(), targets, share, 0.1, True)
    for value, reference in zip(chunk_loss(logits, targets, share, 0.1, True), expected):
        torch.testing.assert_close(value, reference)


def test_auto_falls_back_to_torch_when_triton_does_not_import(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    monkeypatch.delitem(sys.modules, "lrm_train.nn.cross_entropy_triton", raising=False)
    assert lm_loss_function("auto") is torch_chunk_loss
    with pytest.raises(ValueError, match=r"^model.lm_loss_backend=triton: the Triton cross-entropy does not import"):
        FalconH1LM(dataclasses.replace(preset("tiny"), lm_loss_backend="triton"))


def test_the_backend_is_a_runtime_choice_left_out_of_saved_models(tmp_path):
    assert "lm_loss_backend" in RUNTIME_FIELDS
    model = FalconH1LM(dataclasses.replace(preset("tiny"), num_hidden_layers=1, lm_loss_backend="torch"))
    save_model(model, tmp_path / "m")
    assert "lm_loss_backend" not in json.loads((tmp_path / "m" / "config.json").read_text())["model"]


def test_the_triton_backend_needs_a_cuda_device():
    cfg = RunConfig()
    cfg.model = dataclasses.replace(preset("tiny"), lm_loss_backend="triton")
    cfg.dist.device = "cpu"
    with pytest.raises(ValueError, match=r"^model.lm_loss_backend=triton needs a CUDA device"):
        validate(cfg)
