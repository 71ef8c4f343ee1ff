"""The paper's projector experiment: sweep S = sqrt(lr/wd) of the LM head at a fixed sqrt(lr*wd).

    python -m lrm_train.experiments.norm_sweep [experiment=norm_sweep_gpu] [key=value ...]

The LM head's LR and WD are set through its class multipliers so that sqrt(lr*wd) = ``effective_lr`` and
sqrt(lr/wd) = S for each S of ``scales``; everything else trains as usual. ABM puts the head's norm at
||W|| ≈ S/sqrt(2), so S moves the logits' scale unless something learnable can undo it. Arms (trainer overrides):
``frozen`` - no multipliers and frozen norm weights (``optim.norm.lr_mult=0``: AdamW's step, weight decay included,
is scaled by the LR, so a zero LR leaves the weights at 1); ``scalar`` - a learnable scalar on every matrix, the
head's included, norms frozen; ``vector`` - learnable norm weights, the final RMSNorm's being the head's column
multipliers. The paper: the frozen arm degrades at extreme S, the multiplier arms stay flat while ||W|| follows S.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lrm_train.experiments.experiment import Experiment, ExperimentSettings, finished
from lrm_train.experiments.report import markdown_table, new_figure, save_figure, write_report
from lrm_train.experiments.results import read_metrics
from lrm_train.experiments.runner import RunSpec, create_out_dir, make_run
from lrm_train.train import compose
from lrm_train.train.metrics import MULTIPLIER_KEY, NORM_EFF_KEY, NORM_KEY


@dataclass
class NormSweepSettings(ExperimentSettings):
    out_dir: str = "experiments/norm_sweep"
    scales: list[float] = field(default_factory=lambda: [1 / 64, 1 / 8, 1.0, 8.0, 64.0])  # S = sqrt(lr/wd): 8^-2..8^2
    # sqrt(lr*wd) of the head: 1/effective_lr^2 steps is the head's equilibration time, which the runs must exceed.
    effective_lr: float = 0.14
    arms: dict[str, list[str]] = field(
        default_factory=lambda: {
            "frozen": ["lrm=none", "optim.norm.lr_mult=0"],
            "scalar": ["lrm=scalar", "optim.norm.lr_mult=0"],
            "vector": ["lrm=none"],
        }
    )
    trainer: list[str] = field(default_factory=list)  # the model, data and length of every run

    def __post_init__(self) -> None:
        super().__post_init__()
        # S and effective_lr set the head's lr and wd as their product and quotient, and S is plotted on logs.
        if not self.scales:
            raise ValueError("scales=[] must hold at least one S")
        if any(s <= 0 for s in self.scales):
            raise ValueError(f"scales={self.scales}: every S must be > 0")
        if self.effective_lr <= 0:
            raise ValueError(f"effective_lr={self.effective_lr} must be > 0")


def head_overrides(settings: NormSweepSettings, scale: float, base_lr: float, base_wd: float) -> list[str]:
    lr, wd = settings.effective_lr * scale, settings.effective_lr / scale
    return [f"optim.lm_head.lr_mult={lr / base_lr}", f"optim.lm_head.wd_mult={wd / base_wd}"]


def plan(settings: NormSweepSettings) -> list[RunSpec]:
    """Every run composed before any trains (a bad key fails first), labelled by arm and S."""
    base = compose(list(settings.trainer)).optim  # the base LR and WD that the class multipliers scale
    if base.weight_decay <= 0:
        raise ValueError(
            f"trainer: optim.weight_decay={base.weight_decay} must be > 0 here (the LM head's weight decay is set as "
            "a multiple of it)"
        )
    runs = []
    for arm, arm_overrides in settings.arms.items():
        for scale in settings.scales:
            name = f"{arm}_S{scale:g}"
            overrides = [
                *settings.trainer,
                *arm_overrides,
                *head_overrides(settings, scale, base.lr, base.weight_decay),
            ]
            run_dir = Path(settings.out_dir) / "runs" / name
            runs.append(make_run(f"norm_sweep_{name}", run_dir, overrides, arm=arm, S=scale))
    return runs


def final_values(run_dir: Path) -> dict:
    """The final validation loss and the LM head's norms (and scalar, when it has one) from the run's metrics."""
    records = read_metrics(run_dir)
    last = {}
    for record in records:
        last.update({k: v for k, v in record.items() if v is not None})
    values = dict(val_loss=last["val_loss"], norm=last[f"{NORM_KEY}lm_head"], norm_eff=last[f"{NORM_EFF_KEY}lm_head"])
    if f"{MULTIPLIER_KEY}lm_head.lrm_scalar" in last:
        values["head_scalar"] = last[f"{MULTIPLIER_KEY}lm_head.lrm_scalar"]
    return values


def report(settings: NormSweepSettings, runs: list[RunSpec]) -> Path:
    out_dir = create_out_dir(settings.out_dir)
    results = {(run.labels["arm"], run.labels["S"]): final_values(run.run_dir) for run in finished(runs)}
    spreads = {}
    for arm in settings.arms:
        losses = [results[(arm, s)]["val_loss"] for s in settings.scales]
        spreads[arm] = dict(min=min(losses), max=max(losses), spread=max(losses) - min(losses))

    fig, (loss_ax, norm_ax) = new_figure(2, f"LM-head norm sweep at sqrt(lr*wd) = {settings.effective_lr:g}")
    for i, arm in enumerate(settings.arms):
        loss_ax.semilogx(settings.scales, [results[(arm, s)]["val_loss"] for s in settings.scales], "o-", label=arm)
        norm_ax.loglog(settings.scales, [results[(arm, s)]["norm"] for s in settings.scales], "o-", label=arm)
    norm_ax.loglog(settings.scales, [s / math.sqrt(2) for s in settings.scales], "k--", label="S/sqrt(2) (ABM)")
    loss_ax.set(xlabel="S = sqrt(lr/wd) of the LM head", ylabel="final validation loss")
    norm_ax.set(xlabel="S = sqrt(lr/wd) of the LM head", ylabel="||W|| of the LM head (RMS)")
    loss_ax.legend()
    norm_ax.legend()
    figure = save_figure(fig, out_dir / "norm_sweep.png")

    rows = []
    for (arm, scale), values in results.items():
        rows.append([arm, scale, values["val_loss"], values["norm"], values["norm_eff"], values.get("head_scalar")])
    spread_rows = [[arm, v["min"], v["max"], v["spread"]] for arm, v in spreads.items()]
    text = f"""
The LM head's sqrt(lr*wd) is fixed at {settings.effective_lr:g} while S = sqrt(lr/wd) sweeps {settings.scales};
arms: {", ".join(f"`{arm}` ({' '.join(o)})" for arm, o in settings.arms.items())}; every run: {settings.trainer}.

![norm sweep]({figure})

## Spread of the final validation loss across S

The paper: the frozen arm degrades at extreme S, the multiplier arms stay flat.

{markdown_table(["arm", "min loss", "max loss", "spread (max - min)"], spread_rows)}

## Every run

{markdown_table(["arm", "S", "final val loss", "‖W‖ head", "‖W_eff‖ head", "head scalar"], rows)}
"""
    data = dict(
        settings=dataclasses.asdict(settings),
        spread=spreads,
        runs=[dict(arm=arm, S=scale, **values) for (arm, scale), values in results.items()],
    )
    path = write_report(out_dir, "Norm sweep (LM head)", text, data)
    for arm, v in spreads.items():
        print(f"norm_sweep: {arm}: final loss {v['min']:.3f}..{v['max']:.3f} across S (spread {v['spread']:.3f})")
    return path


NORM_SWEEP = Experiment("norm_sweep", NormSweepSettings, plan, report, __doc__)
run, main = NORM_SWEEP.run, NORM_SWEEP.main


if __name__ == "__main__":
    sys.exit(main())
