"""AdamW, written once: ``adamw_update_`` is the per-tensor step that every engine applies.

The update is ``torch.optim.AdamW``'s (decoupled weight decay, bias-corrected moments; its single-tensor path,
operation for operation), and the state keeps its keys (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints are
interchangeable with it. The single/DDP optimizer applies it parameter by parameter, the ZeRO client shard by shard:
elementwise, so a shard of a flat group gets exactly the update of the parameters it holds.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer


def adamw_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
) -> None:
    """One AdamW step of ``param`` in place; ``state`` (empty at first) holds its moments and step count."""
    if not state:
        # The step count stays a float32 scalar on the CPU, as torch.optim.AdamW keeps it (no device sync per step).
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(param)
        state["exp_avg_sq"] = torch.zeros_like(param)
    beta1, beta2 = betas
    state["step"] += 1
    step = float(state["step"])
    param.mul_(1 - lr * weight_decay)
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    param.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))


class AdamW(Optimizer):
    """``adamw_update_`` on every parameter with a gradient, group by group (deterministic: a fixed order)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    adamw_update_(
                        p, p.grad, self.state[p], group["lr"], group["weight_decay"], group["betas"], group["eps"]
                    )
        return loss
