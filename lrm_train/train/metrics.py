"""The trajectories the paper studies, gathered in one batched pass, and the Adam-Brownian-motion prediction.

Names are stable, so runs can be compared in W&B:
- ``lrm/<param>``: a scalar multiplier's value; ``lrm/<param>/{mean,std,min,max}`` for row/column multipliers;
- ``norm/<matrix>``: RMS of the stored weight ``||W||``; ``norm_eff/<matrix>``: RMS of ``W_eff``;
- ``abm/<class>``: the norm predicted by Adam Brownian motion (ABM) for that parameter class.

ABM (lrm.md): feed i.i.d. N(0, 1) "gradients" to the run's own optimizer with the run's LR/WD history; the norm of
that shadow parameter is where noise and weight decay alone would put ``||W||``. Matrix norms in real training follow
it closely; the multipliers escape it. Each shadow is a 64x64 matrix initialized like the model's matrices, stepped
with its class's current LR, WD and optimizer (AdamW or Muon) at every training step.
"""

from __future__ import annotations

import torch
from torch import nn

from lrm_train.nn import MultipliedMatrix
from lrm_train.optim import Muon, ParamClass

ABM_CLASSES = (ParamClass.MATRIX, ParamClass.EMBEDDING, ParamClass.LM_HEAD)
_ABM_SHAPE = (64, 64)


@torch.no_grad()
def trajectory_metrics(model: nn.Module, abm: AdamBrownianMotion | None = None) -> dict[str, float]:
    names, values = [], []
    for name, matrix in model.named_modules():
        if not isinstance(matrix, MultipliedMatrix):
            continue
        names += [f"norm/{name}", f"norm_eff/{name}"]
        values += [matrix.weight.float().pow(2).mean().sqrt(), matrix.effective_weight().float().pow(2).mean().sqrt()]
        for kind in ("lrm_scalar", "lrm_row", "lrm_col"):
            p = getattr(matrix, kind)
            if p is None:
                continue
            key = f"lrm/{name}.{kind}"
            if kind == "lrm_scalar":
                names.append(key)
                values.append(p[0].float())
            else:
                names += [f"{key}/mean", f"{key}/std", f"{key}/min", f"{key}/max"]
                values += [p.mean(), p.std(correction=0), p.min(), p.max()]
    if abm is not None:
        for cls, norm in abm.norms().items():
            names.append(f"abm/{cls}")
            values.append(norm)
    if not values:
        return {}
    return dict(zip(names, torch.stack([v.detach().float().cpu() for v in values]).tolist()))


class AdamBrownianMotion:
    def __init__(self, optimizer, init_std: float, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.shadows: dict[str, tuple[nn.Parameter, torch.optim.Optimizer, dict]] = {}
        for group in optimizer.param_groups:
            if group["param_class"] not in {c.value for c in ABM_CLASSES}:
                continue
            shadow = nn.Parameter(torch.randn(_ABM_SHAPE, generator=self.generator) * init_std)
            if group["use_muon"]:
                opt = Muon(
                    [shadow],
                    lr=group["lr"],
                    momentum=group["momentum"],
                    nesterov=group["nesterov"],
                    ns_steps=group["ns_steps"],
                    ns_dtype="float32",
                    adjust_lr=group["adjust_lr"],
                )
            else:
                opt = torch.optim.AdamW([shadow], lr=group["lr"], betas=group["betas"], eps=group["eps"])
            self.shadows[group["param_class"]] = (shadow, opt, group)

    def step(self) -> None:
        for shadow, opt, group in self.shadows.values():
            opt.param_groups[0]["lr"] = group["lr"]
            opt.param_groups[0]["weight_decay"] = group["weight_decay"]
            shadow.grad = torch.randn(_ABM_SHAPE, generator=self.generator)
            opt.step()

    def norms(self) -> dict[str, torch.Tensor]:
        return {cls: shadow.detach().pow(2).mean().sqrt() for cls, (shadow, _, _) in self.shadows.items()}

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "shadows": {
                cls: {"param": s.detach().clone(), "optimizer": o.state_dict()}
                for cls, (s, o, _) in self.shadows.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        for cls, saved in state["shadows"].items():
            shadow, opt, _ = self.shadows[cls]
            with torch.no_grad():
                shadow.copy_(saved["param"])
            opt.load_state_dict(saved["optimizer"])
