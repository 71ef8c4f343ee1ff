"""The LM head's per-chunk cross-entropy as one Triton kernel, in place on the chunk's logits.

For each row (token) of a chunk's logits, in the matmul's dtype (bf16 under autocast), the kernel

1. reads the row once for log Z, with a running maximum and a sum of exponentials rescaled whenever the maximum
   grows (float32), and picks up the target's logit;
2. reads it again and overwrites it with the gradient of ``share * (log Z - logit[target] + w log Z^2)``, that is
   ``softmax * (1 + 2 w log Z) * share - onehot(target) * share``, in the logits' dtype.

That is one read pass and one read+write pass over [chunk, vocab], where ``loss.torch_chunk_loss`` makes seven over a
float32 copy: at the 0.5B model's chunk (1024 x 32784, bf16) 0.20 GB of traffic instead of 1.48 GB. The host sums
the per-row results into the cross-entropy and the z-loss as that function's caller does. ``share`` is the token's
share of the mean (1/count, 0 for the ignored positions), so ignored rows get a zero gradient whatever their target.

The kernel needs CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` is set before triton is imported (how the
tests run it). It does no matmul, so the interpreter's bf16 dot does not concern it; its float32 -> bf16 store
truncates there (a GPU rounds to nearest even), which tests/models/bf16_interpreter.py patches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRETED = triton.knobs.runtime.interpret
# Columns per step of a row's loops: the row stays in registers one block at a time, so any vocabulary fits. Not tuned
# on a GPU yet (liger-kernel takes up to 32768 with 32 warps).
MAX_BLOCK_V = 8192
NUM_WARPS = 16


@triton.jit
def _cross_entropy_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    share_ptr,
    log_z_ptr,
    target_logits_ptr,
    vocab,
    z_loss_weight,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)

    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    log_z = running_max + tl.log(running_sum)
    # An ignored position's target may be any integer (ignore_index); its share is 0, so only the load needs guarding.
    target_logit = tl.load(row_ptr + target, mask=(target >= 0) & (target < vocab), other=0.0).to(tl.float32)
    tl.store(log_z_ptr + row, log_z)
    tl.store(target_logits_ptr + row, target_logit)

    if WRITE_GRAD:
        share = tl.load(share_ptr + row)
        scale = (1.0 + 2.0 * z_loss_weight * log_z) * share
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < vocab
            x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
            grad = tl.exp(x - log_z) * scale - tl.where(cols == target, share, 0.0)
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_chunk_(
    logits: torch.Tensor, targets: torch.Tensor, share: torch.Tensor, z_loss_weight: float, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(log_z, target_logits, grad_logits)`` of one chunk, as ``loss.torch_chunk_loss``; ``logits`` [rows, vocab]
    (contiguous rows) becomes ``grad_logits`` in place when ``need_grad``, and is left as it was otherwise."""
    if logits.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"model.lm_loss_backend=triton runs on CUDA tensors, got {logits.device.type} ones "
            "(use lm_loss_backend=auto or torch)"
        )
    if logits.stride(1) != 1:
        raise ValueError("the Triton cross-entropy needs logits with contiguous rows")
    rows, vocab = logits.shape
    log_z = torch.empty(rows, dtype=torch.float32, device=logits.device)
    target_logits = torch.empty_like(log_z)
    _cross_entropy_kernel[(rows,)](
        logits,
        logits.stride(0),
        targets.contiguous(),
        share.float().contiguous(),
        log_z,
        target_logits,
        vocab,
        z_loss_weight,
        WRITE_GRAD=need_grad,
        BLOCK_V=min(MAX_BLOCK_V, triton.next_power_of_2(vocab)),
        num_warps=NUM_WARPS,
    )
    return log_z, target_logits, logits if need_grad else None
