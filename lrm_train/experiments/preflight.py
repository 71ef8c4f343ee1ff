"""The pre-flight of the analyses whose effect takes time to show (norm_sweep, width_scaling): before any training,
can the matrices reach the norm weight decay sets, and can the learnable multipliers travel as far as the effect asks?

- **Equilibrium**: under decoupled weight decay a matrix's norm settles at its noise/WD equilibrium within about
  1/(lr wd) steps; a run lasts T_eq = wd * sum_t lr_t of them (the schedule's summed LR factor times the group's lr,
  role and class multipliers included). T_eq < 1: the measured norm is still the initialization's, not the
  equilibrium the paper's argument rests on.
- **Travel**: a plain (not log) multiplier under Adam moves by at most about its LR per step (the update is
  normalized), so over the run it travels sum_t lr_t at most. A multiplier that must move further ends the run at
  that cap, and the analysis measures the cap instead of the data's preference.

Each analysis names what it needs (which parameters must equilibrate, how far each multiplier must move); a design
that falls short is refused in one line (exit status 2) unless ``force=true``, and the report prints the table
either way.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch

from lrm_train.experiments.runner import RunSpec
from lrm_train.models import FalconH1LM
from lrm_train.optim import classify_parameters, summed_lr_factor
from lrm_train.optim.builder import parameter_groups

EQUILIBRIUM, TRAVEL = "equilibration times wd·Σlr", "travel budget Σlr"


@dataclass(frozen=True)
class Budget:
    run: str
    group: str  # the optimizer group: its parameters share one lr and wd
    parameters: str  # the checked parameters of the group: one name, or the first and a count
    kind: str  # EQUILIBRIUM or TRAVEL
    value: float
    needed: float

    @property
    def short(self) -> bool:
        return self.value < self.needed

    def row(self) -> list:
        return [self.run, self.parameters, self.kind, self.value, self.needed, "SHORT" if self.short else "ok"]


HEADER = ["run", "parameters", "budget", "reached", "needed", ""]


def summed_lr(run: RunSpec) -> float:
    """sum_t of the base LR over the run's steps, as the trainer sets it (schedule and batch ramp)."""
    cfg = run.cfg
    return cfg.optim.lr * summed_lr_factor(cfg.schedule, cfg.train.max_steps, cfg.train.grad_accum)


def budgets(run: RunSpec, equilibrate: list[str], travel: dict[str, float]) -> list[Budget]:
    """One ``Budget`` per optimizer group of ``run`` that holds a parameter named by ``equilibrate`` (globs: each
    must reach T_eq >= 1) or by ``travel`` (glob -> the change that multiplier must make; a group's largest counts).
    A glob that names no parameter of the model is an error: a check that checks nothing would pass silently."""
    with torch.device("meta"):  # the groups need the names only
        model = FalconH1LM(run.cfg.model, run.cfg.lrm)
    groups = parameter_groups(model, classify_parameters(model), run.cfg.optim)
    names = [n for g in groups for n in g["names"]]
    for pattern in [*equilibrate, *travel]:
        if not fnmatch.filter(names, pattern):
            raise ValueError(f"run {run.name}: the pre-flight's {pattern!r} names no parameter of the model")
    lr_sum = summed_lr(run)
    out = []
    for group in groups:
        lr = lr_sum * group["lr_mult"]
        steady = [n for n in group["names"] if any(fnmatch.fnmatch(n, p) for p in equilibrate)]
        if steady:
            out.append(Budget(run.name, group["name"], _named(steady), EQUILIBRIUM, lr * group["weight_decay"], 1.0))
        moving = [n for n in group["names"] if any(fnmatch.fnmatch(n, p) for p in travel)]
        if moving:
            needed = max(c for n in moving for p, c in travel.items() if fnmatch.fnmatch(n, p))
            out.append(Budget(run.name, group["name"], _named(moving), TRAVEL, lr, needed))
    return out


def _named(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more"


def refuse_short(rows: list[Budget], force: bool) -> None:
    """One line naming the first short budget and its numbers (exit status 2), unless ``force``."""
    short = [b for b in rows if b.short]
    if short and not force:
        b = short[0]
        raise ValueError(
            f"pre-flight: run {b.run}: {b.parameters} ({b.group}) reaches {b.kind} = {b.value:.3g} < {b.needed:.3g} "
            f"needed ({len(short)} short budget(s) in all); lengthen the runs or raise the LR, or force=true"
        )
