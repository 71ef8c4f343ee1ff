"""Learnable multipliers (LRM): the whole method in one file.

Every matrix layer of the model stores a plain weight ``W`` ([rows, cols], PyTorch's [out, in] for a linear layer,
[vocab, d_model] for an embedding) and uses the effective weight

    W_eff = m * s * r[:, None] * W * c[None, :]

- ``m``: the fixed forward (muP) multiplier, a Python float from the model config;
- ``s``: an optional learnable scalar  (parameter ``lrm_scalar``, float32 of shape [1]: one element, but not
  0-dim, which frameworks that flatten or broadcast parameters byte-wise, such as DeepSpeed, cannot handle);
- ``r``: optional learnable row multipliers (``lrm_row``, [rows] float32: output features / vocabulary entries);
- ``c``: optional learnable column multipliers (``lrm_col``, [cols] float32: input features / model dimensions).

``W_eff`` is formed with one weight-sized pass and fed to a single matmul (or embedding gather): the multipliers never
cost an activation-sized pass. The optimizer and the loggers find the multipliers by their parameter names.

Initialization (``LRMConfig.init``) decides where the muP value ``m_mup`` of a layer lives at step 0:
- ``one``: ``m = m_mup`` stays fixed and every learnable multiplier starts at 1.
- ``mup`` (the paper's "FULL"): ``m_mup`` moves into the first learnable multiplier of the layer - the scalar if there
  is one, else every row entry, else every column entry - and the fixed ``m`` becomes 1. A layer with no learnable
  multiplier keeps ``m = m_mup``.
Both give the same ``W_eff`` (and the same logits) at initialization; they differ in what the optimizer moves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Placement(StrEnum):
    """Where the learnable multipliers go (see ``LRMConfig``); the values are the config strings."""

    none = "none"
    scalar = "scalar"
    full = "full"
    symmetry_free = "symmetry_free"


class Init(StrEnum):
    """Where a layer's muP value lives at step 0 (see the module docstring)."""

    one = "one"
    mup = "mup"


PLACEMENTS = tuple(p.value for p in Placement)
INITS = tuple(i.value for i in Init)
MULTIPLIER_NAMES = ("lrm_scalar", "lrm_row", "lrm_col")


class Learnable(NamedTuple):
    """Which learnable multipliers one matrix layer carries."""

    scalar: bool = False
    row: bool = False
    col: bool = False


_NONE = Learnable()


@dataclass
class LRMConfig:
    """Where the learnable multipliers go and how they start.

    placement:
      - ``none``: the muP baseline, fixed forward multipliers only;
      - ``scalar``: one learnable scalar per matrix;
      - ``full``: row and column multipliers on every matrix (the paper's default);
      - ``symmetry_free``: the paper's appendix table, which leaves one side of each symmetry without multipliers.
      Which ``Learnable`` each matrix of a model gets is the model's decision (``models/falcon_h1.py`` for Falcon-H1,
      with the paper's exception for the LM head).
    init: ``one`` or ``mup`` (see the module docstring).
    lm_head_rows: opt in to row multipliers on the LM head (any placement but ``none``).
    The multipliers' weight decay is the optimizer's (``optim.multiplier_weight_decay``).
    """

    placement: Placement = Placement.full
    init: Init = Init.one
    lm_head_rows: bool = False

    def __post_init__(self) -> None:
        # Built from plain strings too (model folders' config.json, LRMConfig("full")): keep the enums.
        if self.placement not in PLACEMENTS:
            raise ValueError(f"lrm.placement={self.placement!r} is not one of {', '.join(PLACEMENTS)}")
        if self.init not in INITS:
            raise ValueError(f"lrm.init={self.init!r} is not one of {', '.join(INITS)}")
        self.placement, self.init = Placement(self.placement), Init(self.init)

    @classmethod
    def from_record(cls, record: dict) -> LRMConfig:
        """The ``lrm`` section of a model folder or checkpoint. Those written while the multipliers' weight decay was
        ``lrm.weight_decay`` still carry it; it shapes no model, so it is dropped."""
        return cls(**{key: value for key, value in record.items() if key != "weight_decay"})


class _RowColScale(torch.autograd.Function):
    """``w * r[:, None] * c[None, :]`` into one buffer, saving only the inputs for backward.

    Plain autograd would keep the weight-sized intermediate ``w * r`` alive until backward; this keeps nothing
    weight-sized beyond ``w`` itself, which autograd holds anyway.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w, r, c)
        return torch.mul(w, r[:, None]).mul_(c)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, r, c = ctx.saved_tensors
        grad_w = grad_r = grad_c = None
        if ctx.needs_input_grad[0]:
            grad_w = torch.mul(grad, r[:, None]).mul_(c)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_times_w = grad * w
            if ctx.needs_input_grad[1]:
                grad_r = grad_times_w @ c
            if ctx.needs_input_grad[2]:
                grad_c = r @ grad_times_w
        return grad_w, grad_r, grad_c


class MultipliedMatrix(nn.Module):
    """A weight ``W`` [rows, cols] with its fixed and learnable multipliers; subclasses say how ``W_eff`` is applied."""

    def __init__(
        self,
        rows: int,
        cols: int,
        multiplier: float = 1.0,
        learnable: Learnable = _NONE,
        init: Init = Init.one,
        init_std: float = 0.02,
        role: str | None = None,
    ) -> None:
        super().__init__()
        self.role = role  # what the matrix is in its model (a model's own vocabulary: export, logging, param groups)
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(rows, cols))
        self.lrm_scalar = nn.Parameter(torch.empty(1, dtype=torch.float32)) if learnable.scalar else None
        self.lrm_row = nn.Parameter(torch.empty(rows, dtype=torch.float32)) if learnable.row else None
        self.lrm_col = nn.Parameter(torch.empty(cols, dtype=torch.float32)) if learnable.col else None
        # With init="mup", the muP value starts in the first learnable multiplier instead of the fixed one.
        absorbing = Init(init) is Init.mup and any(learnable)  # a plain string too: an unknown one fails here
        self.mup_multiplier = float(multiplier)  # what a plain muP layer of this role applies
        self.forward_multiplier = 1.0 if absorbing else float(multiplier)
        self._absorbed = float(multiplier) if absorbing else 1.0
        self.reset_parameters()

    def multipliers(self) -> list[nn.Parameter]:
        return [p for p in (self.lrm_scalar, self.lrm_row, self.lrm_col) if p is not None]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        remaining = self._absorbed
        for p in self.multipliers():
            p.fill_(remaining)
            remaining = 1.0

    def effective_weight(self) -> torch.Tensor:
        w = self.weight
        scale = self.forward_multiplier
        if self.lrm_scalar is not None:
            scale = self.lrm_scalar.to(w.dtype) * scale
        row = None if self.lrm_row is None else self.lrm_row.to(w.dtype) * scale
        col = None if self.lrm_col is None else self.lrm_col.to(w.dtype)
        if row is not None and col is not None:
            return _RowColScale.apply(w, row, col)
        if row is not None:
            return w * row[:, None]
        if col is not None:
            return w * (col * scale)
        if isinstance(scale, float) and scale == 1.0:
            return w
        return w * scale

    @torch.no_grad()
    def merge_(self) -> None:
        """Fold the learnable multipliers into ``W`` and drop them: the same function as a plain muP layer, whose
        fixed multiplier is ``m_mup`` whatever the init (with ``init=mup`` the muP value leaves the multipliers too)."""
        if not self.multipliers():
            return
        self.weight.copy_(self.effective_weight() / self.mup_multiplier)
        self.forward_multiplier, self._absorbed = self.mup_multiplier, 1.0
        self.lrm_scalar = self.lrm_row = self.lrm_col = None

    @torch.no_grad()
    def learned_scale(self) -> float:
        """The factor by which the learnable multipliers moved this matrix's scale from its fixed muP value:
        ``|s x mean(r) x mean(c)|`` with the fixed ``m`` over ``m_mup`` (1, or 1/m_mup under ``init=mup``). Its size
        only: a fresh weight drawn around 0 does not tell a sign from its opposite."""
        scale = self.forward_multiplier / self.mup_multiplier
        for p in self.multipliers():
            scale *= p.double().mean().item()
        return abs(scale)

    def extra_repr(self) -> str:
        rows, cols = self.weight.shape
        names = [n.removeprefix("lrm_") for n in MULTIPLIER_NAMES if getattr(self, n) is not None]
        role = f"{self.role}, " if self.role else ""
        return f"{role}{rows}x{cols}, m={self.forward_multiplier:g}, learnable={'+'.join(names) or 'none'}"


class MultipliedLinear(MultipliedMatrix):
    """``y = x @ W_eff^T`` (no bias)."""

    def __init__(self, in_features: int, out_features: int, **kwargs) -> None:
        super().__init__(out_features, in_features, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight())


class MultipliedEmbedding(MultipliedMatrix):
    """``W_eff[ids]``: rows run over the vocabulary, columns over the model dimension."""

    def __init__(self, num_embeddings: int, embedding_dim: int, **kwargs) -> None:
        super().__init__(num_embeddings, embedding_dim, **kwargs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.effective_weight())


def fused_linear(x: torch.Tensor, layers: Sequence[MultipliedLinear]) -> torch.Tensor:
    """Apply several linear layers that read the same input as one matmul over their stacked effective weights."""
    return F.linear(x, torch.cat([layer.effective_weight() for layer in layers]))


def learned_scales_by_role(modules: Iterable[nn.Module]) -> dict[str, float]:
    """Role -> the geometric mean of ``learned_scale`` over every matrix of that role with learnable multipliers in
    ``modules`` (its layers; several trained copies: their seeds)."""
    logs: dict[str, list[float]] = {}
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, MultipliedMatrix) and layer.multipliers():
                scale = layer.learned_scale()
                if not scale > 0:  # zero (or NaN): no static scale stands for it
                    raise ValueError(f"a {layer.role} matrix's learned multipliers have a mean scale of {scale}")
                logs.setdefault(layer.role, []).append(math.log(scale))
    return {role: math.exp(math.fsum(values) / len(values)) for role, values in logs.items()}


def merge_multipliers_(module: nn.Module) -> None:
    """Fold every learnable multiplier under ``module`` into its weight."""
    for layer in module.modules():
        if isinstance(layer, MultipliedMatrix):
            layer.merge_()
