"""Gradient clipping by parameter class, decided once for every engine.

The paper clips at 1.0 on a global norm that leaves the multipliers out (§4.3): a multiplier sums its gradient over a
whole row or column, so early in training the multipliers' gradients dominate a norm that holds them, and clipping
then throttles the matrices. ``train.clip_multipliers=true`` puts them back in, for the ablation.

Each engine measures its gradients' norms per group of one class (the single and DDP engines from the whole
gradients, ZeRO from its reduced shards summed over ranks) and hands them to ``clipped_norm``, which says what the
clip compares with ``train.grad_clip`` and by how much the clipped classes' gradients are scaled.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lrm_train.optim.param_classes import ParamClass, is_clipped

# As torch.nn.utils.clip_grad_norm_: keeps the factor finite for a zero norm.
_EPS = 1e-6


@dataclass(frozen=True)
class GradNorms:
    """0-d tensors on the device (nothing here waits for it)."""

    clipped: torch.Tensor  # the global norm clipping acts on, before clipping (logged as grad_norm)
    multipliers: torch.Tensor | None  # the multipliers' own norm, in ``clipped`` or not; None without multipliers
    scale: torch.Tensor | None  # the factor for the clipped classes' gradients; None when clipping is off


def clipped_norm(
    norms: Iterable[tuple[ParamClass, torch.Tensor]], clip_multipliers: bool, max_norm: float
) -> GradNorms:
    """``norms``: (class, norm of that part of the gradient) pairs, several per class allowed. A non-finite part
    makes the norms non-finite; the engine's finiteness rule skips such a step."""
    norms = list(norms)
    squares = [n.float().square() for c, n in norms if is_clipped(c, clip_multipliers)]
    clipped = torch.stack(squares).sum().sqrt() if squares else norms[0][1].new_zeros((), dtype=torch.float32)
    multiplier_squares = [n.float().square() for c, n in norms if c is ParamClass.MULTIPLIER]
    multipliers = torch.stack(multiplier_squares).sum().sqrt() if multiplier_squares else None
    scale = torch.clamp(max_norm / (clipped + _EPS), max=1.0) if max_norm > 0 else None
    return GradNorms(clipped, multipliers, scale)
