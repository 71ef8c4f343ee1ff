"""RMSNorm and the grouped, gated RMSNorm of the Mamba2 mixer (both normalize in float32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm over ``groups`` equal slices of the last dimension, with a SiLU gate applied before or after it."""

    def __init__(self, dim: int, groups: int = 1, eps: float = 1e-5, norm_before_gate: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.groups = groups
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        gate = F.silu(gate.float())
        x32 = x.float()
        if not self.norm_before_gate:
            x32 = x32 * gate
        grouped = x32.unflatten(-1, (self.groups, -1))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        x32 = self.weight * grouped.flatten(-2)
        if self.norm_before_gate:
            x32 = x32 * gate
        return x32.to(dtype)
