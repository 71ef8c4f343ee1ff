"""Optimizer construction from the parameter classes: one parameter group per class (or per class and role
pattern), each with its LR and WD.

- AdamW (``optim.name=adamw``): every class under ``optim.AdamW`` (decoupled weight decay; torch's update).
- Muon (``optim.name=muon``): the ``matrix`` class under Muon, every other class under AdamW: the standard split,
  since embeddings, LM head, norms, SSM vectors and multipliers are not matrices Muon should orthogonalize.

A group's learning rate is ``schedule(step) * optim.lr * optim.<class>.lr_mult``: groups carry their ``lr_mult``, and
the trainer sets every step's LR (``set_learning_rates``, the one writer of a group's ``lr``);
its weight decay is ``optim.weight_decay * optim.<class>.wd_mult``, except the multipliers, whose base is the
absolute ``optim.multiplier_weight_decay`` (the paper's 2e-3): ``optim.multiplier_weight_decay *
optim.multiplier.wd_mult``. AdamW's epsilon is ``optim.eps``, scaled under a muP parametrization as the group's
gradients are (``nn.parametrization.gradient_exponent``).

``optim.roles`` refines this per matrix role (Falcon-H1 tunes its LR multipliers per role): each entry's glob
``pattern`` selects roles (``attn.q``, ``ssm.*``, ``embedding``, ``lm_head``; the model's ``MATRIX_ROLES``) and its
``lr_mult``/``wd_mult`` multiply the class's, for the weights of those matrices or, with ``multipliers: true``, for
their learnable multipliers. Matched parameters form their own group ``<class>/<pattern>``; a pattern that matches
nothing, or a parameter matched by two patterns, is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import NotRequired, TypedDict

import torch
from torch import nn

from lrm_train.nn.parametrization import Parametrization, WidthClass, gradient_exponent
from lrm_train.optim.adamw import AdamW
from lrm_train.optim.muon import AdjustLR, Muon, NSDtype
from lrm_train.optim.param_classes import ParamClass, parameter_roles


class OptimizerName(StrEnum):
    adamw = "adamw"
    muon = "muon"  # Muon on the matrix class, AdamW on every other class


class ParamGroup(TypedDict):
    """A parameter group as ``parameter_groups`` makes it, read by the engines, the clipping and the ABM. The optimizer
    adds its settings, and ``set_learning_rates`` the group's ``lr``."""

    params: list[nn.Parameter]
    names: list[str]  # the parameters' names, in the order of params
    name: str  # the class, or "<class>/<role pattern>"
    param_class: str  # a ParamClass value
    lr_mult: float
    weight_decay: float
    eps: NotRequired[float]  # AdamW's epsilon, width-scaled as the group's gradients; Muon groups keep Muon's own
    use_muon: bool


@dataclass
class ClassHyper:
    lr_mult: float = 1.0
    wd_mult: float = 1.0


@dataclass
class RoleHyper:
    """LR and WD multipliers for the matrices of the roles ``pattern`` matches (a glob), or their multipliers."""

    pattern: str = "???"
    multipliers: bool = False  # false: the matrices' weights; true: their learnable multipliers (lrm_*)
    lr_mult: float = 1.0
    wd_mult: float = 1.0

    @property
    def param_class(self) -> str:
        return ParamClass.MULTIPLIER.value if self.multipliers else "matrix weight"


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 3e-3
    weight_decay: float = 0.1
    # The multipliers' base decay, in place of weight_decay: it pins the symmetries down (the paper: 2e-3).
    multiplier_weight_decay: float = 2e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # Per parameter class (muP style): LR and WD multipliers.
    matrix: ClassHyper = field(default_factory=ClassHyper)
    embedding: ClassHyper = field(default_factory=ClassHyper)
    lm_head: ClassHyper = field(default_factory=ClassHyper)
    multiplier: ClassHyper = field(default_factory=ClassHyper)  # wd: multiplier_weight_decay * multiplier.wd_mult
    norm: ClassHyper = field(default_factory=lambda: ClassHyper(wd_mult=0.0))
    ssm_vector: ClassHyper = field(default_factory=lambda: ClassHyper(wd_mult=0.0))
    # Per matrix role, on top of the class's multipliers (see the module docstring).
    roles: list[RoleHyper] = field(default_factory=list)
    # Muon (matrices only).
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_ns_dtype: NSDtype = NSDtype.auto  # auto: bf16 on CUDA, float32 on CPU
    muon_adjust_lr: AdjustLR = AdjustLR.match_rms_adamw  # or original (Keller Jordan's sqrt(max(1, rows/cols)))
    # Under model.parametrization=mup: the exponent p of the hidden matrices' LR factor r^p (their weight decay gets
    # r^-p). None: the derived one, AdamW -1 and Muon -1/2, which assume an update fully aligned with the features it
    # meets; at finite width it may align less (Everett et al. 2024), which a measured exponent accounts for.
    hidden_lr_exponent: float | None = None

    def __post_init__(self) -> None:
        if self.name not in set(OptimizerName):
            raise ValueError(f"optim.name={self.name!r} is not one of {', '.join(OptimizerName)}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas needs 2 values, got {list(self.betas)}")
        checks = {
            "optim.lr": (self.lr, self.lr > 0, "must be > 0"),
            "optim.weight_decay": (self.weight_decay, self.weight_decay >= 0, "must be >= 0"),
            "optim.multiplier_weight_decay": (
                self.multiplier_weight_decay,
                self.multiplier_weight_decay >= 0,
                "must be >= 0",
            ),
            "optim.eps": (self.eps, self.eps >= 0, "must be >= 0"),
            "optim.muon_momentum": (self.muon_momentum, 0 <= self.muon_momentum < 1, "must be in [0, 1)"),
            "optim.muon_ns_steps": (self.muon_ns_steps, self.muon_ns_steps >= 1, "must be >= 1"),
            "optim.hidden_lr_exponent": (
                self.hidden_lr_exponent,
                self.hidden_lr_exponent is None or math.isfinite(self.hidden_lr_exponent),
                "must be a finite number (or null: the optimizer's derived exponent)",
            ),
        }
        for i, beta in enumerate(self.betas):
            checks[f"optim.betas[{i}]"] = (beta, 0 <= beta < 1, "must be in [0, 1)")
        for cls in ParamClass:
            hyper = self.hyper(cls)
            checks[f"optim.{cls.value}.lr_mult"] = (hyper.lr_mult, hyper.lr_mult >= 0, "must be >= 0")
            checks[f"optim.{cls.value}.wd_mult"] = (hyper.wd_mult, hyper.wd_mult >= 0, "must be >= 0")
        for i, role in enumerate(self.roles):
            checks[f"optim.roles[{i}].lr_mult"] = (role.lr_mult, role.lr_mult >= 0, "must be >= 0")
            checks[f"optim.roles[{i}].wd_mult"] = (role.wd_mult, role.wd_mult >= 0, "must be >= 0")
        for key, (value, ok, rule) in checks.items():
            if not ok:
                raise ValueError(f"{key}={value} {rule}")

    def hyper(self, cls: ParamClass) -> ClassHyper:
        return getattr(self, cls.value)


class CombinedOptimizer:
    """Several optimizers stepped as one (AdamW + Muon); ``param_groups`` spans all of them."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[ParamGroup]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    def step(self, apply: torch.Tensor | None = None) -> None:
        """``apply``: a 0-d bool tensor on the device; False skips the step there (no host sync)."""
        for opt in self.optimizers:
            opt.step(apply=apply)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def load_param_state(self, param: torch.Tensor, state: dict) -> None:
        """Set one parameter's state (a copy, placed as the optimizers keep it) in whichever optimizer holds it.

        Checkpoints load on the CPU: every entry goes to the parameter's device, the moments and momentum in its
        dtype, AdamW's step count as the float32 scalar it always is (``adamw_update_``).
        """
        placed = {
            key: value.to(param.device, torch.float32 if key == "step" else param.dtype, copy=True)
            for key, value in state.items()
        }
        for opt in self.optimizers:
            if any(p is param for g in opt.param_groups for p in g["params"]):
                opt.state[param] = placed
                return
        raise KeyError("parameter not held by this optimizer")


def _role_entry(cfg: OptimConfig, cls: ParamClass, role: str | None, name: str) -> int | None:
    """The index of the ``optim.roles`` entry that applies to this parameter, if any (never two)."""
    if role is None or cls not in (ParamClass.MATRIX, ParamClass.EMBEDDING, ParamClass.LM_HEAD, ParamClass.MULTIPLIER):
        return None
    matches = [
        i
        for i, entry in enumerate(cfg.roles)
        if entry.multipliers == (cls is ParamClass.MULTIPLIER) and fnmatchcase(role, entry.pattern)
    ]
    if len(matches) > 1:
        first, second = (cfg.roles[i].pattern for i in matches[:2])
        raise ValueError(f"optim.roles: {name} (role {role}) is matched by both {first!r} and {second!r}")
    return matches[0] if matches else None


def width_lr_exponent(
    parametrization: Parametrization, width: WidthClass | None, use_muon: bool, hidden_exponent: float | None = None
) -> float:
    """The exponent p of the LR factor r^p (r = d / d0) of a parameter; its weight decay gets r^-p, so lr x wd (the
    decay per step) stays width-independent.

    Only standard muP (``mup``) moves LRs, and only hidden matrices' (``nn.parametrization``): an Adam update's entries
    are the LR's size whatever the gradient, and d of them align in a product, so the LR falls as 1/d; Muon's
    RMS-matched update (0.2 sqrt(max(rows, cols)) x an orthogonal matrix) already grows as sqrt(d), so its LR falls as
    1/sqrt(d). Readouts carry their 1/d in the forward multiplier; embeddings and vectors keep their LR.
    ``hidden_exponent`` (``optim.hidden_lr_exponent``) replaces the derived hidden exponent when given.
    """
    if parametrization is not Parametrization.mup or width is not WidthClass.hidden:
        return 0.0
    if hidden_exponent is not None:
        return hidden_exponent
    return -0.5 if use_muon else -1.0


def parameter_groups(model: nn.Module, classes: dict[str, ParamClass], cfg: OptimConfig) -> list[ParamGroup]:
    """One group per class, and per class and ``optim.roles`` entry for the parameters an entry matches; under a muP
    parametrization, the hidden matrices in a group of their own (``<group>@hidden``): their LR (``mup``) or their
    gradients' scale, hence AdamW's epsilon (``nn.parametrization.gradient_exponent``), follow the width differently."""
    params = dict(model.named_parameters())
    parametrization, ratio = model.width_scaling()
    all_roles = parameter_roles(model)
    roles = {name: role.role for name, role in all_roles.items()}
    members: dict[tuple[ParamClass, int | None, bool], list[str]] = {}
    for name, cls in classes.items():
        hidden = parametrization is not Parametrization.standard and all_roles[name].width is WidthClass.hidden
        members.setdefault((cls, _role_entry(cfg, cls, roles[name], name), hidden), []).append(name)
    for i, entry in enumerate(cfg.roles):
        if not any(index == i for _, index, _ in members):
            known = sorted({r for r in roles.values() if r is not None})
            raise ValueError(
                f"optim.roles[{i}].pattern={entry.pattern!r} matches no {entry.param_class} of this model "
                f"(roles: {', '.join(known)})"
            )
    groups: list[ParamGroup] = []
    for (cls, index, hidden), names in sorted(members.items(), key=lambda item: _group_order(*item[0])):
        hyper = cfg.hyper(cls)
        entry = cfg.roles[index] if index is not None else RoleHyper(pattern="")
        base_decay = cfg.multiplier_weight_decay if cls is ParamClass.MULTIPLIER else cfg.weight_decay
        name = cls.value if index is None else f"{cls.value}/{entry.pattern}"
        use_muon = cfg.name == OptimizerName.muon and cls is ParamClass.MATRIX
        width = all_roles[names[0]].width  # every member scales alike (hidden matrices have their own group)
        exponent = width_lr_exponent(parametrization, width, use_muon, cfg.hidden_lr_exponent)
        group = ParamGroup(
            params=[params[n] for n in names],
            names=names,
            name=f"{name}@{WidthClass.hidden}" if hidden else name,
            param_class=cls.value,
            lr_mult=hyper.lr_mult * entry.lr_mult * ratio**exponent,
            weight_decay=base_decay * hyper.wd_mult * entry.wd_mult * ratio**-exponent,
            use_muon=use_muon,
        )
        if not use_muon:
            group["eps"] = cfg.eps * ratio ** gradient_exponent(parametrization, width)
        groups.append(group)
    return groups


def _group_order(cls: ParamClass, index: int | None, hidden: bool) -> tuple:
    """Classes in ParamClass order; within one, the class's own group, then its role entries; hidden matrices last."""
    return list(ParamClass).index(cls), -1 if index is None else index, hidden


def make_optimizer(
    groups: list[dict], use_muon: bool, cfg: OptimConfig, share_across_ranks: bool = True
) -> torch.optim.Optimizer:
    """The optimizer of these groups: Muon or AdamW with the run's settings (groups carry their own wd; their lr is
    ``set_learning_rates``'s to write, before each step).

    ``share_across_ranks=False`` for parameters that are not the model's (the ABM's shadows, on each rank's CPU):
    Muon then never splits its work across ranks, which would be a collective.
    """
    if use_muon:
        return Muon(
            groups,
            momentum=cfg.muon_momentum,
            nesterov=cfg.muon_nesterov,
            ns_steps=cfg.muon_ns_steps,
            ns_dtype=cfg.muon_ns_dtype,
            adjust_lr=cfg.muon_adjust_lr,
            share_across_ranks=share_across_ranks,
        )
    return AdamW(groups, betas=tuple(cfg.betas), eps=cfg.eps)


def build_optimizer(model: nn.Module, classes: dict[str, ParamClass], cfg: OptimConfig):
    groups = parameter_groups(model, classes, cfg)
    optimizers = [make_optimizer([g for g in groups if not g["use_muon"]], use_muon=False, cfg=cfg)]
    muon_groups = [g for g in groups if g["use_muon"]]
    if muon_groups:
        optimizers.append(make_optimizer(muon_groups, use_muon=True, cfg=cfg))
    return CombinedOptimizer(optimizers)


def set_learning_rates(optimizer, lr: float) -> None:
    """Each group's LR: ``lr`` (``optim.lr`` times the schedule's factor at this step) times the group's ``lr_mult``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]


def class_table(optimizer) -> list[dict]:
    """One row per parameter group (a class, or a class and role pattern): what the optimizer really holds."""
    rows = []
    for group in optimizer.param_groups:
        rows.append(
            {
                "group": group["name"],
                "count": len(group["params"]),
                "numel": sum(p.numel() for p in group["params"]),
                "optimizer": "muon" if group["use_muon"] else "adamw",
                "lr": group["lr"],
                "wd": group["weight_decay"],
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    width = max([12, *(len(r["group"]) + 2 for r in rows)])
    lines = [f"{'group':<{width}}{'count':>7}{'numel':>13}  {'optimizer':<10}{'lr':>11}{'wd':>10}"]
    for r in rows:
        lines.append(
            f"{r['group']:<{width}}{r['count']:>7}{r['numel']:>13,}  {r['optimizer']:<10}{r['lr']:>11.3g}"
            f"{r['wd']:>10.3g}"
        )
    return "\n".join(lines)
