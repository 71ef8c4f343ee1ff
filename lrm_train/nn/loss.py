"""Language-model loss: cross-entropy in float32 with an optional z-loss on the log-partition function."""

from __future__ import annotations

from typing import NamedTuple

import torch


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
