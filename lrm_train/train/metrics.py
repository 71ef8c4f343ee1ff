"""The trajectories the paper studies, gathered in one batched pass, and the Adam-Brownian-motion prediction.

Names are stable, so runs can be compared in W&B:
- ``lrm/<param>``: a scalar multiplier's value; ``lrm/<param>/{mean,std,min,max}`` for row/column multipliers;
- ``norm/<matrix>``: RMS of the stored weight ``||W||``; ``norm_eff/<matrix>``: RMS of ``W_eff``;
- ``abm/<group>/<rows>x<cols>``: the norm predicted by Adam Brownian motion (ABM) for the matrices of that shape in
  that parameter group (``abm/matrix/128x256``; a per-role group gives ``abm/matrix/attn.*/128x128``).

ABM (lrm.md): feed i.i.d. N(0, 1) "gradients" to the run's own optimizer with the run's LR/WD history; the norm of
that shadow parameter is where noise and weight decay alone would put ``||W||``. Matrix norms in real training follow
it closely; the multipliers escape it. Muon's equilibrium depends on the matrix's shape, so there is one shadow per
group and distinct shape, initialized like the model's matrices and stepped with its group's current LR, WD and
optimizer (AdamW or Muon) at every applied training step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from lrm_train.nn import MultipliedMatrix
from lrm_train.optim import OptimConfig, ParamClass, adjusted_lr, make_optimizer

# The key prefixes above, for whatever reads metrics.jsonl (the experiments' reports) without spelling them again.
MULTIPLIER_KEY, NORM_KEY, NORM_EFF_KEY, ABM_KEY = "lrm/", "norm/", "norm_eff/", "abm/"
ABM_CLASSES = (ParamClass.MATRIX, ParamClass.EMBEDDING, ParamClass.LM_HEAD)
ABM_MAX_SIDE = 128  # the longest side a shadow is simulated at (see simulated_shape)


@torch.no_grad()
def trajectory_metrics(model: nn.Module, abm: AdamBrownianMotion | None = None) -> dict[str, float]:
    names, values = [], []
    for name, matrix in model.named_modules():
        if not isinstance(matrix, MultipliedMatrix):
            continue
        names += [f"{NORM_KEY}{name}", f"{NORM_EFF_KEY}{name}"]
        values += [matrix.weight.float().pow(2).mean().sqrt(), matrix.effective_weight().float().pow(2).mean().sqrt()]
        for kind in ("lrm_scalar", "lrm_row", "lrm_col"):
            p = getattr(matrix, kind)
            if p is None:
                continue
            key = f"{MULTIPLIER_KEY}{name}.{kind}"
            if kind == "lrm_scalar":
                names.append(key)
                values.append(p[0].float())
            else:
                names += [f"{key}/mean", f"{key}/std", f"{key}/min", f"{key}/max"]
                values += [p.mean(), p.std(correction=0), p.min(), p.max()]
    if abm is not None:
        for key, norm in abm.norms().items():
            names.append(f"{ABM_KEY}{key}")
            values.append(norm)
    if not values:
        return {}
    return dict(zip(names, torch.stack([v.detach().float().cpu() for v in values]).tolist()))


def simulated_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """The shape a shadow is simulated at: the real one, or scaled down by a common factor (the aspect ratio kept)
    so that its long side is at most ``ABM_MAX_SIDE``.

    The ABM runs every training step, Newton-Schulz included, for every distinct shape: a 2048x1024 shadow would cost
    more than a small model's step on a CPU. What sets the equilibrium is the aspect ratio (Muon's spectrum) and the
    update size, not the number of entries, and ``size_correction`` carries the update size over exactly.
    """
    factor = math.ceil(max(shape) / ABM_MAX_SIDE)
    return tuple(max(1, round(side / factor)) for side in shape)


def size_correction(shape: tuple[int, int], simulated: tuple[int, int], muon_rule: str | None) -> float:
    """Real norm / simulated norm. The shadow's noise never depends on its weights, so the shadow is a linear filter
    of its updates and its norm scales with their RMS: 1 for AdamW (elementwise); for Muon, the orthogonalized
    update's RMS (1/sqrt(long side)) times the shape's LR factor, real over simulated."""
    if muon_rule is None or shape == simulated:
        return 1.0

    def update_rms(s: tuple[int, int]) -> float:
        return adjusted_lr(1.0, torch.Size(s), muon_rule) / math.sqrt(max(s))

    return update_rms(shape) / update_rms(simulated)


def matrix_init_stds(model) -> dict[str, float]:
    """Each matrix weight's init std by parameter name (what the ABM's shadows start from)."""
    return {f"{name}.weight": matrix.init_std for name, matrix in model.matrices().items()}


class _Shadow(NamedTuple):
    param: nn.Parameter
    optimizer: torch.optim.Optimizer
    group: dict  # the run's parameter group whose LR and WD the shadow follows
    correction: float  # real norm / simulated norm


class AdamBrownianMotion:
    """One shadow per parameter group and distinct shape of the ABM classes, keyed ``<group>/<rows>x<cols>``.

    Each shadow's optimizer comes from the run's own construction code (``optim.make_optimizer`` with the run's
    ``OptimConfig``); its LR and WD follow its group every step. ``shapes``: every parameter's full shape by name
    (``engine.parameter_shapes()``, which ZeRO-3's partitioning does not hide); ``init_stds``: each matrix weight's
    init std by name (``matrix_init_stds``; a muP parametrization scales it per width class).
    """

    def __init__(
        self,
        optimizer,
        optim_cfg: OptimConfig,
        shapes: dict[str, torch.Size],
        init_stds: dict[str, float],
        seed: int,
    ) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.shadows: dict[str, _Shadow] = {}
        for group in optimizer.param_groups:
            if group["param_class"] not in {c.value for c in ABM_CLASSES}:
                continue
            first_of_shape: dict[tuple, str] = {}
            for name in group["names"]:
                first_of_shape.setdefault(tuple(shapes[name]), name)
            for shape, name in first_of_shape.items():
                init_std = init_stds[name]
                simulated = simulated_shape(shape)
                rule = str(optim_cfg.muon_adjust_lr) if group["use_muon"] else None
                correction = size_correction(shape, simulated, rule)
                # Initialized like the model's matrices, as seen through the correction.
                param = nn.Parameter(torch.randn(simulated, generator=self.generator) * (init_std / correction))
                width_scaled = {"eps": group["eps"]} if "eps" in group else {}  # AdamW's epsilon, as the group's
                shadow_optimizer = make_optimizer(
                    [{"params": [param], **width_scaled}], group["use_muon"], optim_cfg, False
                )
                key = f"{group['name']}/{shape[0]}x{shape[1]}"
                self.shadows[key] = _Shadow(param, shadow_optimizer, group, correction)

    def hyperparameters(self) -> list[tuple[float, float]]:
        """Each shadow's LR and WD now (its group's), for a ``step`` taken later."""
        return [(s.group["lr"], s.group["weight_decay"]) for s in self.shadows.values()]

    def step(self, hyperparameters: list[tuple[float, float]] | None = None) -> None:
        for shadow, (lr, wd) in zip(self.shadows.values(), hyperparameters or self.hyperparameters()):
            shadow_group = shadow.optimizer.param_groups[0]
            shadow_group["lr"], shadow_group["weight_decay"] = lr, wd
            shadow.param.grad = torch.randn(shadow.param.shape, generator=self.generator)
            shadow.optimizer.step()

    def norms(self) -> dict[str, torch.Tensor]:
        """The predicted RMS of ``W`` per ``<group>/<rows>x<cols>``."""
        return {key: s.param.detach().pow(2).mean().sqrt() * s.correction for key, s in self.shadows.items()}

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "shadows": {
                key: {"param": s.param.detach().clone(), "optimizer": s.optimizer.state_dict()}
                for key, s in self.shadows.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadows"]) != set(self.shadows):
            raise ValueError(
                f"the checkpoint's ABM shadows ({', '.join(sorted(state['shadows']))}) are not this run's "
                f"({', '.join(sorted(self.shadows))})"
            )
        self.generator.set_state(state["generator"])
        for key, saved in state["shadows"].items():
            shadow = self.shadows[key]
            with torch.no_grad():
                shadow.param.copy_(saved["param"])
            shadow.optimizer.load_state_dict(saved["optimizer"])
