"""Muon for matrices: Nesterov momentum, Newton-Schulz orthogonalization, decoupled weight decay.

Same update as ``torch.optim.Muon`` (momentum ``buf = mu*buf + (1-mu)*g``, Nesterov ``g + mu*(buf - g)``, quintic
Newton-Schulz, ``W *= 1 - lr*wd``, then ``W -= adjusted_lr * O``), with two differences that matter here:

- Newton-Schulz runs in ``ns_dtype``: ``auto`` is bf16 on CUDA and float32 on CPU, where bf16 matmuls are ~20x slower.
- Under data parallelism every rank keeps the (cheap) momentum of every matrix - the gradients are identical after
  the all-reduce, so the optimizer state is the same on every rank and a checkpoint of rank 0 resumes on any world
  size - but each rank orthogonalizes only its share of the matrices, and the results are all-gathered.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.optim import Optimizer

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR = ("match_rms_adamw", "original")


def newton_schulz(grad: torch.Tensor, steps: int, dtype: torch.dtype, eps: float = 1e-7) -> torch.Tensor:
    """An approximate ``U V^T`` of ``grad = U S V^T`` (singular values pushed into about [0.7, 1.2])."""
    a, b, c = NS_COEFFICIENTS
    x = grad.to(dtype)
    transposed = grad.size(0) > grad.size(1)
    if transposed:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if transposed else x


def adjusted_lr(lr: float, shape: torch.Size, rule: str) -> float:
    rows, cols = shape
    if rule == "match_rms_adamw":  # Moonlight: update RMS about 0.2*lr, like AdamW's
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1.0, rows / cols))  # Keller Jordan's original scaling


class Muon(Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: str = "auto",
        adjust_lr: str = "match_rms_adamw",
        eps: float = 1e-7,
    ) -> None:
        if adjust_lr not in ADJUST_LR:
            raise ValueError(f"optim.muon_adjust_lr={adjust_lr!r} is not one of {', '.join(ADJUST_LR)}")
        if ns_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"optim.muon_ns_dtype={ns_dtype!r} is not one of auto, float32, bfloat16")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            adjust_lr=adjust_lr,
            eps=eps,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")

    @staticmethod
    def _ns_dtype(group: dict, device: torch.device) -> torch.dtype:
        if group["ns_dtype"] == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, group["ns_dtype"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        work = []  # (param, group, direction to orthogonalize)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                work.append((p, group, p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf))
        for (p, group, _), update in zip(work, self._orthogonalize(work)):
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update.to(p.dtype), alpha=-adjusted_lr(group["lr"], p.shape, group["adjust_lr"]))
        return loss

    def _orthogonalize(self, work: list) -> list[torch.Tensor]:
        """Newton-Schulz of every direction; with several ranks each computes its share and all-gathers."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0

        def orthogonalize(index: int) -> torch.Tensor:
            p, group, direction = work[index]
            return newton_schulz(direction, group["ns_steps"], self._ns_dtype(group, p.device), group["eps"]).float()

        if world == 1:
            return [orthogonalize(i) for i in range(len(work))]
        updates: list[torch.Tensor | None] = [None] * len(work)
        by_shape = defaultdict(list)  # all_gather needs equal shapes
        for i, (p, _, _) in enumerate(work):
            by_shape[tuple(p.shape)].append(i)
        for shape, indices in by_shape.items():
            for start in range(0, len(indices), world):
                chunk = indices[start : start + world]
                mine = (
                    orthogonalize(chunk[rank])
                    if rank < len(chunk)
                    else work[chunk[0]][0].new_zeros(shape, dtype=torch.float32)
                )
                gathered = [torch.empty_like(mine) for _ in range(world)]
                dist.all_gather(gathered, mine.contiguous())
                for index, update in zip(chunk, gathered):
                    updates[index] = update
        return updates
