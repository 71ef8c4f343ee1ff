"""Muon for matrices: Nesterov momentum, Newton-Schulz orthogonalization, decoupled weight decay.

The per-matrix math (``muon_direction_``, ``orthogonalize``, ``decoupled_step_``) is written once here and used by
this optimizer and by the ZeRO client. Same update as ``torch.optim.Muon`` (momentum ``buf = mu*buf + (1-mu)*g``, Nesterov ``g + mu*(buf - g)``, quintic
Newton-Schulz, ``W *= 1 - lr*wd``, then ``W -= adjusted_lr * O``), with these differences:

- Newton-Schulz runs in ``ns_dtype``: ``auto`` is bf16 on CUDA and float32 on CPU, where bf16 matmuls are ~20x slower.
- Under data parallelism every rank keeps the (cheap) momentum of every matrix - the gradients are identical after
  the all-reduce, so the optimizer state is the same on every rank and a checkpoint of rank 0 resumes on any world
  size - but each rank orthogonalizes only its share of the matrices, and the results are all-gathered
  (``share_of_matrices``, ``exchange_updates``: the ZeRO client shares the work the same way).
- ``apply`` (a 0-d bool tensor) skips a step on the device, leaving weights and momentum bitwise unchanged.
"""

from __future__ import annotations

import math
from collections import defaultdict
from enum import StrEnum

import torch
import torch.distributed as dist
from torch.optim import Optimizer

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


class AdjustLR(StrEnum):
    """How a matrix's shape scales Muon's learning rate."""

    match_rms_adamw = "match_rms_adamw"  # Moonlight: update RMS about 0.2*lr, like AdamW's
    original = "original"  # Keller Jordan's sqrt(max(1, rows/cols))


class NSDtype(StrEnum):
    """The dtype Newton-Schulz runs in."""

    auto = "auto"  # bf16 on CUDA, float32 on CPU (where bf16 matmuls are ~20x slower)
    float32 = "float32"
    bfloat16 = "bfloat16"


def ns_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype of Newton-Schulz for an ``NSDtype`` setting on this device."""
    if setting == NSDtype.auto:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, str(setting))


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
    """Muon's learning rate for a matrix of this shape."""
    rows, cols = shape
    if rule == AdjustLR.match_rms_adamw:
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1.0, rows / cols))


def muon_direction_(
    grad: torch.Tensor, state: dict, momentum: float, nesterov: bool, apply: torch.Tensor | None = None
) -> torch.Tensor:
    """Update the momentum in ``state`` (empty at first) with ``grad``; return the direction to orthogonalize.

    Elementwise, so it runs on a shard as well as on a whole matrix. ``apply`` False (a 0-d bool tensor, decided on the
    device): the momentum stays bitwise unchanged and the direction is finite whatever ``grad`` holds."""
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(grad)
    buf = state["momentum_buffer"]
    if apply is not None:
        grad = torch.where(apply, grad, buf)  # the momentum itself: its lerp towards it is a no-op
    buf.lerp_(grad, 1 - momentum)
    return grad.lerp(buf, momentum) if nesterov else buf


def orthogonalize(direction: torch.Tensor, ns_steps: int, dtype: torch.dtype, eps: float) -> torch.Tensor:
    """Newton-Schulz of a Muon direction, returned in float32."""
    return newton_schulz(direction, ns_steps, dtype, eps).float()


def decoupled_step_(
    param: torch.Tensor,
    update: torch.Tensor,
    lr: float,
    weight_decay: float,
    step_lr: float,
    apply: torch.Tensor | None = None,
) -> None:
    """``W *= 1 - lr * wd`` then ``W -= step_lr * update`` (Muon's step once the update is orthogonalized); nothing
    changes where ``apply`` is False (a 0-d bool tensor on the device; ``update`` must then be finite)."""
    if apply is None:
        param.mul_(1 - lr * weight_decay)
        param.add_(update.to(param.dtype), alpha=-step_lr)
        return
    param.mul_(torch.where(apply, 1 - lr * weight_decay, 1.0))
    param.add_(torch.where(apply, update.to(param.dtype), 0.0), alpha=-step_lr)


def share_of_matrices(shapes: list[tuple[int, int]], world: int):
    """How ranks share the Newton-Schulz work: chunks of at most ``world`` matrices of one shape (all_gather needs
    equal shapes), yielded as (shape, indices); in each chunk, rank r orthogonalizes ``indices[r]``."""
    by_shape = defaultdict(list)
    for i, shape in enumerate(shapes):
        by_shape[tuple(shape)].append(i)
    for shape, indices in by_shape.items():
        for start in range(0, len(indices), world):
            yield shape, indices[start : start + world]


def exchange_updates(mine: torch.Tensor | None, shape: tuple[int, int], world: int, device) -> list[torch.Tensor]:
    """All-gather the chunk's orthogonalized matrices: ``mine`` from this rank (None: it had none in this chunk),
    returned in rank order (collective)."""
    if mine is None:
        mine = torch.zeros(shape, dtype=torch.float32, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine.contiguous())
    return gathered


class Muon(Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: str = NSDtype.auto,
        adjust_lr: str = AdjustLR.match_rms_adamw,
        eps: float = 1e-7,
        share_across_ranks: bool = True,
    ) -> None:
        if adjust_lr not in set(AdjustLR):
            raise ValueError(f"optim.muon_adjust_lr={adjust_lr!r} is not one of {', '.join(AdjustLR)}")
        if ns_dtype not in set(NSDtype):
            raise ValueError(f"optim.muon_ns_dtype={ns_dtype!r} is not one of {', '.join(NSDtype)}")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_dtype=str(ns_dtype),  # plain strings: groups go into checkpoints, which load without custom classes
            adjust_lr=str(adjust_lr),
            eps=eps,
        )
        super().__init__(params, defaults)
        self.share_across_ranks = share_across_ranks  # False: every rank orthogonalizes all (no collective)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None, apply: torch.Tensor | None = None):
        """``apply``: a 0-d bool tensor on the parameters' device; False skips the step on the device."""
        loss = None if closure is None else closure()
        work = []  # (param, group, direction to orthogonalize)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                direction = muon_direction_(p.grad, self.state[p], group["momentum"], group["nesterov"], apply)
                work.append((p, group, direction))
        for (p, group, _), update in zip(work, self._orthogonalize(work)):
            step_lr = adjusted_lr(group["lr"], p.shape, group["adjust_lr"])
            decoupled_step_(p, update, group["lr"], group["weight_decay"], step_lr, apply)
        return loss

    def _orthogonalize(self, work: list) -> list[torch.Tensor]:
        """Newton-Schulz of every direction; with several ranks each computes its share and all-gathers."""
        shared = self.share_across_ranks and dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if shared else 1
        rank = dist.get_rank() if world > 1 else 0

        def orthogonalize_one(index: int) -> torch.Tensor:
            p, group, direction = work[index]
            return orthogonalize(direction, group["ns_steps"], ns_dtype(group["ns_dtype"], p.device), group["eps"])

        if world == 1:
            return [orthogonalize_one(i) for i in range(len(work))]
        updates: list[torch.Tensor | None] = [None] * len(work)
        device = work[0][0].device if work else None
        for shape, chunk in share_of_matrices([p.shape for p, _, _ in work], world):
            mine = orthogonalize_one(chunk[rank]) if rank < len(chunk) else None
            for index, update in zip(chunk, exchange_updates(mine, shape, world, device)):
                updates[index] = update
        return updates
