"""Language-model loss: cross-entropy in float32 with an optional z-loss on the log-partition function.

Two ways to it, with the same value and gradients:
- ``lm_loss(logits, targets)`` on logits one already has (evaluation harnesses, tests);
- ``LMHead``, the output layer, whose ``forward(hidden, targets)`` goes from the hidden states to the loss chunk by
  chunk of tokens and never holds the [tokens, vocab] float32 logits: each chunk's gradient is computed right away
  (in the forward pass, while its logits exist) and the logits are dropped. At the 0.5B model's vocabulary, seq 4096
  and batch 8 the full logits and their gradient are ~9 GB; a chunk is the size of the hidden states.

A chunk's log-partition and logits' gradient come from ``torch_chunk_loss`` (float32 passes in PyTorch: the CPU path
and the reference) or, on CUDA, from the fused kernel of ``nn.cross_entropy_triton`` (one read and one read+write pass
over the logits in the matmul's dtype), as ``model.lm_loss_backend`` picks when the head is built
(``lm_loss_function``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from lrm_train.nn.kernels import KernelBackend, kernel_function
from lrm_train.nn.multipliers import MultipliedLinear

# A chunk's logits hold about as many numbers as the hidden states of the whole batch (liger-kernel's choice: the
# loss then costs no more memory than one more activation), and at least this many (32 MB in float32): smaller
# chunks run slower matmuls.
MIN_CHUNK_ELEMENTS = 1 << 23


class LMLoss(NamedTuple):
    loss: torch.Tensor  # what to backpropagate: cross_entropy + z_loss_weight * z_loss
    cross_entropy: torch.Tensor
    z_loss: torch.Tensor  # mean of logsumexp(logits)^2, reported even when its weight is 0


def lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, z_loss_weight: float = 0.0, ignore_index: int = -100
) -> LMLoss:
    """Mean over the target positions that are not ``ignore_index``; ``logits`` [..., vocab], ``targets`` [...]."""
    logits = logits.float().flatten(0, -2)
    targets = targets.flatten()
    valid = targets != ignore_index
    log_z = torch.logsumexp(logits, dim=-1)
    # F.cross_entropy would compute logsumexp again; reuse it: CE = log Z - logit[target].
    target_logits = logits.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    count = valid.sum().clamp(min=1)
    cross_entropy = ((log_z - target_logits) * valid).sum() / count
    z_loss = (log_z.pow(2) * valid).sum() / count
    return LMLoss(cross_entropy + z_loss_weight * z_loss, cross_entropy, z_loss)


def chunk_tokens(tokens: int, hidden_size: int, vocab_size: int) -> int:
    """A power of two (as liger-kernel's chunks, so the matmuls get whole tiles): the one nearest the hidden states'
    size, but not below the floor's."""
    nearest = 1 << max(0, round(math.log2(tokens * hidden_size / vocab_size)))
    floor = 1 << max(0, math.ceil(math.log2(MIN_CHUNK_ELEMENTS / vocab_size)))
    return max(nearest, floor)


def _matmul_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """What a matmul runs in here: autocast's dtype when it is on, as ``F.linear`` would."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype


# One chunk's (log_z, target_logits, grad_logits or None) from its logits [rows, vocab] in the matmul dtype, the
# targets (clamped to >= 0), each token's share of the mean, the z-loss weight and need_grad; the gradient of
# sum(share * (log Z - logit[target] + w log Z^2)) in the logits' dtype. It may overwrite the logits.
ChunkLoss = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def torch_chunk_loss(
    logits: torch.Tensor, targets: torch.Tensor, share: torch.Tensor, z_loss_weight: float, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The ``ChunkLoss`` in PyTorch: the CPU path and the reference of ``nn.cross_entropy_triton``."""
    matmul_dtype = logits.dtype
    logits = logits.float()
    target_index = targets[:, None]
    target_logits = logits.gather(-1, target_index).squeeze(-1)
    # logsumexp by hand, so that its exponentials (made in place in the logits' buffer) are reused for the softmax of
    # the gradient instead of computed twice.
    row_max = logits.amax(dim=-1, keepdim=True)
    exps = logits.sub_(row_max).exp_()
    partition = exps.sum(dim=-1)
    log_z = partition.log() + row_max.squeeze(-1)
    if not need_grad:
        return log_z, target_logits, None
    # d(log Z - logit[t] + w log Z^2)/d logits = softmax * (1 + 2 w log Z) - onehot(t), times the token's share of
    # the mean.
    grad_logits = exps.mul_(((1 + 2 * z_loss_weight * log_z) * share / partition)[:, None])
    grad_logits.scatter_add_(-1, target_index, -share[:, None])
    return log_z, target_logits, grad_logits.to(matmul_dtype)


def lm_loss_function(backend: KernelBackend | str) -> ChunkLoss:
    """The ``ChunkLoss`` ``model.lm_loss_backend`` names (``nn.kernels``): ``torch_chunk_loss``, or the fused kernel
    of ``nn.cross_entropy_triton`` (one read and one read+write pass over the logits, in their dtype)."""
    return kernel_function(
        backend, "model.lm_loss_backend", torch_chunk_loss, _triton_chunk_loss, "the Triton cross-entropy"
    )


def _triton_chunk_loss() -> ChunkLoss:
    from lrm_train.nn.cross_entropy_triton import cross_entropy_chunk_

    return cross_entropy_chunk_


class _LinearLMLoss(torch.autograd.Function):
    """``lm_loss(hidden @ weight^T, targets)`` over chunks of tokens, the gradients computed in the forward pass.

    The loss is linear in its upstream gradient (a scalar), so the backward pass only scales the saved gradients.
    The cross-entropy and z-loss it also returns are for reporting: they carry no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, z_loss_weight, ignore_index, need_grad, chunk_loss):
        tokens = hidden.shape[0]
        matmul_dtype = _matmul_dtype(hidden.device, hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            # Cast once here: autocast would cast the (non-leaf) weight again for every chunk.
            weight_mm = weight.to(matmul_dtype)
            valid = targets != ignore_index
            count = valid.sum().clamp(min=1)
            # 1/count per valid token, 0 for the ignored ones: each token's share of the mean.
            share = valid / count
            target_index = targets.clamp(min=0)  # any in-range index: an ignored position's share is 0
            cross_entropy = hidden.new_zeros((), dtype=torch.float32)
            z_loss = hidden.new_zeros((), dtype=torch.float32)
            grad_hidden = torch.empty_like(hidden) if need_grad else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
            step = chunk_tokens(tokens, hidden.shape[1], weight.shape[0])
            for start in range(0, tokens, step):
                rows = slice(start, start + step)
                hidden_mm = hidden[rows].to(matmul_dtype)
                log_z, target_logits, grad_logits = chunk_loss(
                    hidden_mm @ weight_mm.T, target_index[rows], share[rows], z_loss_weight, need_grad
                )
                cross_entropy += ((log_z - target_logits) * share[rows]).sum()
                z_loss += (log_z.square() * share[rows]).sum()
                if need_grad:
                    grad_hidden[rows] = grad_logits @ weight_mm
                    grad_weight += grad_logits.T @ hidden_mm
                # Freed before the next chunk's logits exist: held over, they would double the loss's peak memory.
                del log_z, target_logits, grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(cross_entropy, z_loss)
        return cross_entropy + z_loss_weight * z_loss, cross_entropy, z_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_cross_entropy, _grad_z_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, (grad_weight * grad_loss).to(ctx.weight_dtype), None, None, None, None, None


def linear_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    z_loss_weight: float = 0.0,
    ignore_index: int = -100,
    chunk_loss: ChunkLoss = torch_chunk_loss,
) -> LMLoss:
    """``lm_loss(hidden @ weight^T, targets, ...)`` without the full logits; ``hidden`` [..., d], ``weight`` [vocab, d].

    Under autocast the matmuls run in its dtype, as ``F.linear`` would; the softmax and the sums in float32.
    ``chunk_loss`` computes each chunk's loss and logits' gradient (``lm_loss_function``).
    """
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return LMLoss(
        *_LinearLMLoss.apply(
            hidden.flatten(0, -2), weight, targets.flatten(), float(z_loss_weight), ignore_index, need_grad, chunk_loss
        )
    )


class LMHead(MultipliedLinear):
    """The output layer: ``forward(hidden)`` gives the logits; ``forward(hidden, targets)`` the ``LMLoss`` straight
    from the hidden states (``linear_lm_loss`` over the effective weight, so every multiplier gets its gradient).

    The loss is computed inside this module's forward so that engines which gather a module's parameters when its
    forward runs (DeepSpeed ZeRO-3) gather the LM head's for it. ``loss_backend`` is ``lm_loss_function``'s choice.
    """

    def __init__(self, in_features: int, out_features: int, loss_backend: str = "auto", **kwargs) -> None:
        super().__init__(in_features, out_features, **kwargs)
        self.chunk_loss = lm_loss_function(loss_backend)

    def forward(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor | None = None,
        z_loss_weight: float = 0.0,
        ignore_index: int = -100,
    ) -> torch.Tensor | LMLoss:
        if targets is None:
            return super().forward(hidden)
        return linear_lm_loss(hidden, self.effective_weight(), targets, z_loss_weight, ignore_index, self.chunk_loss)
