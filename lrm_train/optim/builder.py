"""Optimizer construction from the parameter classes: one parameter group per class, each with its LR and WD.

- AdamW (``optim.name=adamw``): every class under ``optim.AdamW`` (decoupled weight decay; torch's update).
- Muon (``optim.name=muon``): the ``matrix`` class under Muon, every other class under AdamW: the standard split,
  since embeddings, LM head, norms, SSM vectors and multipliers are not matrices Muon should orthogonalize.

A group's learning rate is ``schedule(step) * optim.lr * optim.<class>.lr_mult`` (set by ``set_learning_rates``);
its weight decay is ``optim.weight_decay * optim.<class>.wd_mult``, except the multipliers, which take the absolute
``lrm.weight_decay`` (the paper's 2e-3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from lrm_train.nn import LRMConfig
from lrm_train.optim.adamw import AdamW
from lrm_train.optim.muon import AdjustLR, Muon, NSDtype
from lrm_train.optim.param_classes import ParamClass


class OptimizerName(str, Enum):
    adamw = "adamw"
    muon = "muon"  # Muon on the matrix class, AdamW on every other class

    def __str__(self) -> str:
        return self.value


@dataclass
class ClassHyper:
    lr_mult: float = 1.0
    wd_mult: float = 1.0


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # Per parameter class (muP style): LR and WD multipliers.
    matrix: ClassHyper = field(default_factory=ClassHyper)
    embedding: ClassHyper = field(default_factory=ClassHyper)
    lm_head: ClassHyper = field(default_factory=ClassHyper)
    multiplier: ClassHyper = field(default_factory=ClassHyper)  # wd_mult unused: lrm.weight_decay applies
    norm: ClassHyper = field(default_factory=lambda: ClassHyper(wd_mult=0.0))
    ssm_vector: ClassHyper = field(default_factory=lambda: ClassHyper(wd_mult=0.0))
    # Muon (matrices only).
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_ns_dtype: NSDtype = NSDtype.auto  # auto: bf16 on CUDA, float32 on CPU
    muon_adjust_lr: AdjustLR = AdjustLR.match_rms_adamw  # or original (Keller Jordan's sqrt(max(1, rows/cols)))

    def __post_init__(self) -> None:
        if self.name not in set(OptimizerName):
            raise ValueError(f"optim.name={self.name!r} is not one of {', '.join(OptimizerName)}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas needs 2 values, got {list(self.betas)}")

    def hyper(self, cls: ParamClass) -> ClassHyper:
        return getattr(self, cls.value)


class CombinedOptimizer:
    """Several optimizers stepped as one (AdamW + Muon); ``param_groups`` spans all of them."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def load_param_state(self, param: torch.Tensor, state: dict) -> None:
        """Set one parameter's state (a copy, placed as the optimizers keep it) in whichever optimizer holds it.

        Checkpoints load on the CPU: moments and momentum go to the parameter's device and dtype, which the update
        needs them on; AdamW's step count stays the float32 CPU scalar it always is (``adamw_update_``).
        """
        placed = {
            key: value.to("cpu", torch.float32, copy=True)
            if key == "step"
            else value.to(param.device, param.dtype, copy=True)
            for key, value in state.items()
        }
        for opt in self.optimizers:
            if any(p is param for g in opt.param_groups for p in g["params"]):
                opt.state[param] = placed
                return
        raise KeyError("parameter not held by this optimizer")


def parameter_groups(model: nn.Module, classes: dict[str, ParamClass], cfg: OptimConfig, lrm: LRMConfig) -> list[dict]:
    params = dict(model.named_parameters())
    groups = []
    for cls in ParamClass:
        names = [n for n, c in classes.items() if c is cls]
        if not names:
            continue
        hyper = cfg.hyper(cls)
        weight_decay = lrm.weight_decay if cls is ParamClass.MULTIPLIER else cfg.weight_decay * hyper.wd_mult
        groups.append(
            {
                "params": [params[n] for n in names],
                "names": names,
                "param_class": cls.value,
                "lr": cfg.lr * hyper.lr_mult,
                "lr_mult": hyper.lr_mult,
                "weight_decay": weight_decay,
                "use_muon": cfg.name == "muon" and cls is ParamClass.MATRIX,
            }
        )
    return groups


def make_optimizer(groups: list[dict], use_muon: bool, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer of these groups: Muon or AdamW with the run's settings (groups carry their own lr and wd)."""
    if use_muon:
        return Muon(
            groups,
            lr=cfg.lr,
            momentum=cfg.muon_momentum,
            nesterov=cfg.muon_nesterov,
            ns_steps=cfg.muon_ns_steps,
            ns_dtype=cfg.muon_ns_dtype,
            adjust_lr=cfg.muon_adjust_lr,
        )
    return AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def build_optimizer(model: nn.Module, classes: dict[str, ParamClass], cfg: OptimConfig, lrm: LRMConfig):
    groups = parameter_groups(model, classes, cfg, lrm)
    optimizers = [make_optimizer([g for g in groups if not g["use_muon"]], use_muon=False, cfg=cfg)]
    muon_groups = [g for g in groups if g["use_muon"]]
    if muon_groups:
        optimizers.append(make_optimizer(muon_groups, use_muon=True, cfg=cfg))
    return CombinedOptimizer(optimizers)


def set_learning_rates(optimizer, base_lr: float, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor * group["lr_mult"]


def class_table(optimizer) -> list[dict]:
    """One row per parameter class: what the optimizer really holds."""
    rows = []
    for group in optimizer.param_groups:
        rows.append(
            {
                "class": group["param_class"],
                "count": len(group["params"]),
                "numel": sum(p.numel() for p in group["params"]),
                "optimizer": "muon" if group["use_muon"] else "adamw",
                "lr": group["lr"],
                "wd": group["weight_decay"],
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'class':<12}{'count':>7}{'numel':>13}  {'optimizer':<10}{'lr':>11}{'wd':>10}"]
    for r in rows:
        lines.append(
            f"{r['class']:<12}{r['count']:>7}{r['numel']:>13,}  {r['optimizer']:<10}{r['lr']:>11.3g}{r['wd']:>10.3g}"
        )
    return "\n".join(lines)
