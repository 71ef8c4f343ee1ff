import weakref

import pytest
import torch
import torch.nn.functional as F

from lrm_train.models import FalconH1Config, FalconH1LM
from lrm_train.nn import LRMConfig, lm_loss
from lrm_train.nn import loss as loss_module
from lrm_train.nn.loss import linear_lm_loss

VOCAB, HIDDEN = 50, 16


@pytest.fixture
def small_chunks(monkeypatch):
    """No floor on the chunk size: the 30 tokens below go in chunks of 8, the power of two nearest 30 x 16 / 50 = 9.6
    (the last one short)."""
    monkeypatch.setattr(loss_module, "MIN_CHUNK_ELEMENTS", 1)


def inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 10, HIDDEN, generator=generator, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator).mul_(0.5).requires_grad_()
    targets = torch.randint(0, VOCAB, (3, 10), generator=generator)
    targets[0, :4] = -100
    targets[2, 9] = -100
    return hidden, weight, targets


def test_a_chunk_of_logits_is_the_size_of_the_hidden_states_or_of_the_floor(small_chunks):
    assert loss_module.chunk_tokens(30, HIDDEN, VOCAB) == 8
    assert loss_module.chunk_tokens(32768, 1024, 32784) == 1024  # the 0.5B model at batch 8 x 4096 (1023.5 tokens)


def test_small_batches_have_a_floor_of_32_mb_per_chunk():
    assert loss_module.chunk_tokens(2048, 128, 8192) == 1024  # the tiny model at batch 8 x 256
    assert loss_module.chunk_tokens(2048, 128, 32784) == 256  # 8M / 32784 = 255.9 tokens, rounded up to the floor


@pytest.mark.parametrize(
    "tokens, hidden, vocab", [(32768, 1024, 32784), (4096, 1024, 131072), (65536, 2048, 65537), (7, 3, 50), (1, 1, 9)]
)
def test_chunks_are_powers_of_two_within_a_factor_sqrt2_of_the_target_and_never_below_the_floor(tokens, hidden, vocab):
    chunk = loss_module.chunk_tokens(tokens, hidden, vocab)
    elements, floor = chunk * vocab, loss_module.MIN_CHUNK_ELEMENTS
    assert chunk >= 1 and chunk & (chunk - 1) == 0
    assert elements >= floor and elements >= tokens * hidden / 2**0.5
    assert elements <= tokens * hidden * 2**0.5 or elements < 2 * floor  # the nearest, or the floor's power of two


@pytest.mark.parametrize("z_loss_weight", [0.0, 0.1])
def test_linear_lm_loss_equals_lm_loss_on_the_logits_with_the_same_gradients(small_chunks, z_loss_weight):
    hidden, weight, targets = inputs()
    expected = lm_loss(hidden @ weight.T, targets, z_loss_weight)
    expected_grads = torch.autograd.grad(expected.loss * 3, (hidden, weight))
    got = linear_lm_loss(hidden, weight, targets, z_loss_weight)
    for value, reference in zip(got, expected):
        torch.testing.assert_close(value, reference.detach())
    grads = torch.autograd.grad(got.loss * 3, (hidden, weight))  # the upstream gradient scales them
    for grad, reference in zip(grads, expected_grads):
        torch.testing.assert_close(grad, reference)
    # The ignored positions get no gradient; the reported parts carry none.
    assert grads[0][0, :4].abs().max() == 0 and grads[0][2, 9].abs().max() == 0
    assert not got.cross_entropy.requires_grad and not got.z_loss.requires_grad


def test_linear_lm_loss_matches_cross_entropy_and_another_ignore_index(small_chunks):
    hidden, weight, targets = inputs(1)
    targets[targets == -100] = 7
    targets[1, 3] = 7
    out = linear_lm_loss(hidden, weight, targets, ignore_index=7)
    reference = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), ignore_index=7)
    torch.testing.assert_close(out.cross_entropy, reference)


def test_the_full_logits_are_never_kept_for_backward(small_chunks):
    hidden, weight, targets = inputs()
    saved = []

    def keep(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        linear_lm_loss(hidden, weight, targets, 0.1).loss.backward()
    assert saved and max(saved) <= max(hidden.numel(), weight.numel())
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        lm_loss(hidden @ weight.T, targets, 0.1).loss.backward()
    assert max(saved) == 30 * VOCAB  # what the plain path keeps, so the hook does see it


def test_one_chunk_of_logits_is_alive_at_a_time(small_chunks):
    """The previous chunk's logits (its gradient, computed in place) are freed before the next chunk's exist: held
    over, they doubled the loss's peak memory (the memory estimate counts one chunk)."""
    hidden, weight, targets = inputs()
    previous = []

    def chunk_loss(*args):
        assert all(ref() is None for ref in previous), "the previous chunk's logits are still alive"
        log_z, target_logits, grad_logits = loss_module.torch_chunk_loss(*args)
        previous.append(weakref.ref(grad_logits))
        return log_z, target_logits, grad_logits

    linear_lm_loss(hidden, weight, targets, 0.1, chunk_loss=chunk_loss).loss.backward()
    assert len(previous) == 4  # 30 tokens in chunks of 8


def test_without_grad_it_only_computes_the_loss(small_chunks):
    hidden, weight, targets = inputs()
    expected = lm_loss(hidden @ weight.T, targets, 0.1)
    with torch.no_grad():
        got = linear_lm_loss(hidden, weight, targets, 0.1)
    assert not got.loss.requires_grad
    torch.testing.assert_close(got.loss, expected.loss.detach())


def test_under_autocast_it_matches_the_plain_path_within_bf16_tolerance(small_chunks):
    hidden, weight, targets = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = lm_loss(F.linear(hidden, weight), targets, 0.1)
        got = linear_lm_loss(hidden, weight, targets, 0.1)
    expected_grads = torch.autograd.grad(expected.loss, (hidden, weight))
    grads = torch.autograd.grad(got.loss, (hidden, weight))
    torch.testing.assert_close(got.loss, expected.loss.detach(), rtol=1e-3, atol=1e-3)
    for grad, reference in zip(grads, expected_grads):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, reference, rtol=2e-2, atol=2e-3)


def tiny_config() -> FalconH1Config:
    return FalconH1Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        mamba_d_ssm=32,
        mamba_n_heads=2,
        mamba_d_head=16,
        mamba_chunk_size=8,
        lm_head_multiplier=0.25,
    )


@pytest.mark.parametrize("lrm", [LRMConfig("full", lm_head_rows=True), LRMConfig("scalar", init="mup")])
def test_the_model_with_targets_gives_the_loss_and_gradients_of_its_logits(small_chunks, lrm):
    torch.manual_seed(0)
    model = FalconH1LM(tiny_config(), lrm)
    with torch.no_grad():  # multipliers away from their init, so a wrong fold would show
        for p in model.lm_head.multipliers():
            p.uniform_(0.5, 1.5)
    ids = torch.randint(0, VOCAB, (2, 13))
    inputs_, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[0, :2] = -100
    expected = lm_loss(model(inputs_), targets, 0.01)
    expected.loss.backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    got = model(inputs_, targets, 0.01)
    got.loss.backward()
    for value, reference in zip(got, expected):
        torch.testing.assert_close(value, reference.detach())
    assert {"lm_head.weight", "lm_head.lrm_scalar"} <= set(expected_grads)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], msg=name)
