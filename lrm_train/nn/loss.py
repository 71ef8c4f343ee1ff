"""Language-model loss: cross-entropy in float32 with an optional z-loss on the log-partition function.

Two ways to it, with the same value and gradients:
- ``lm_loss(logits, targets)`` on logits one already has (evaluation harnesses, tests);
- ``LMHead``, the output layer, whose ``forward(hidden, targets)`` goes from the hidden states to the loss chunk by
  chunk of tokens and never holds the [tokens, vocab] float32 logits: each chunk's gradient is computed right away
  (in the forward pass, while its logits exist) and the logits are dropped. At the 0.5B model's vocabulary, seq 4096
  and batch 8 the full logits and their gradient are ~9 GB; a chunk is the size of the hidden states.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

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
    return max(1, max(MIN_CHUNK_ELEMENTS, tokens * hidden_size) // vocab_size)


def _matmul_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """What a matmul runs in here: autocast's dtype when it is on, as ``F.linear`` would."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype


class _LinearLMLoss(torch.autograd.Function):
    """``lm_loss(hidden @ weight^T, targets)`` over chunks of tokens, the gradients computed in the forward pass.

    The loss is linear in its upstream gradient (a scalar), so the backward pass only scales the saved gradients.
    The cross-entropy and z-loss it also returns are for reporting: they carry no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, z_loss_weight, ignore_index, need_grad):
        tokens = hidden.shape[0]
        matmul_dtype = _matmul_dtype(hidden.device, hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            # Cast once here: autocast would cast the (non-leaf) weight again for every chunk.
            weight_mm = weight.to(matmul_dtype)
            valid = targets != ignore_index
            count = valid.sum().clamp(min=1)
            # 1/count per valid token, 0 for the ignored ones: each token's share of the mean.
            share = valid / count
            target_index = targets.clamp(min=0)[:, None]
            cross_entropy = hidden.new_zeros((), dtype=torch.float32)
            z_loss = hidden.new_zeros((), dtype=torch.float32)
            grad_hidden = torch.empty_like(hidden) if need_grad else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
            step = chunk_tokens(tokens, hidden.shape[1], weight.shape[0])
            for start in range(0, tokens, step):
                rows = slice(start, start + step)
                hidden_mm = hidden[rows].to(matmul_dtype)
                logits = (hidden_mm @ weight_mm.T).float()
                target_logits = logits.gather(-1, target_index[rows]).squeeze(-1)
                # logsumexp by hand, so that its exponentials (made in place in the logits' buffer) are reused for
                # the softmax of the gradient instead of computed twice.
                row_max = logits.amax(dim=-1, keepdim=True)
                exps = logits.sub_(row_max).exp_()
                partition = exps.sum(dim=-1)
                log_z = partition.log() + row_max.squeeze(-1)
                cross_entropy += ((log_z - target_logits) * share[rows]).sum()
                z_loss += (log_z.square() * share[rows]).sum()
                if not need_grad:
                    continue
                # d(log Z - logit[t] + w log Z^2)/d logits = softmax * (1 + 2 w log Z) - onehot(t), times the token's
                # share of the mean.
                grad_logits = exps.mul_(((1 + 2 * z_loss_weight * log_z) * share[rows] / partition)[:, None])
                grad_logits.scatter_add_(-1, target_index[rows], -share[rows][:, None])
                grad_logits = grad_logits.to(matmul_dtype)
                grad_hidden[rows] = grad_logits @ weight_mm
                grad_weight += grad_logits.T @ hidden_mm
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(cross_entropy, z_loss)
        return cross_entropy + z_loss_weight * z_loss, cross_entropy, z_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_cross_entropy, _grad_z_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, (grad_weight * grad_loss).to(ctx.weight_dtype), None, None, None, None


def linear_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    z_loss_weight: float = 0.0,
    ignore_index: int = -100,
) -> LMLoss:
    """``lm_loss(hidden @ weight^T, targets, ...)`` without the full logits; ``hidden`` [..., d], ``weight`` [vocab, d].

    Under autocast the matmuls run in its dtype, as ``F.linear`` would; the softmax and the sums in float32.
    """
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return LMLoss(
        *_LinearLMLoss.apply(
            hidden.flatten(0, -2), weight, targets.flatten(), float(z_loss_weight), ignore_index, need_grad
        )
    )


class LMHead(MultipliedLinear):
    """The output layer: ``forward(hidden)`` gives the logits; ``forward(hidden, targets)`` the ``LMLoss`` straight
    from the hidden states (``linear_lm_loss`` over the effective weight, so every multiplier gets its gradient).

    The loss is computed inside this module's forward so that engines which gather a module's parameters when its
    forward runs (DeepSpeed ZeRO-3) gather the LM head's for it.
    """

    def forward(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor | None = None,
        z_loss_weight: float = 0.0,
        ignore_index: int = -100,
    ) -> torch.Tensor | LMLoss:
        if targets is None:
            return super().forward(hidden)
        return linear_lm_loss(hidden, self.effective_weight(), targets, z_loss_weight, ignore_index)
