"""Adam Brownian motion (ABM): where noise and weight decay alone put a matrix's norm.

    python -m lrm_train.experiments.abm [experiment=abm_gpu] [run=path/to/run_dir] [key=value ...]

i.i.d. N(0, 1) "gradients" go to the trainer's own optimizer - built by the trainer's construction code for the
model and each (lr, wd) of the sweep, AdamW or Muon - through ``train.metrics.AdamBrownianMotion``, the very code the
trainer logs as ``abm/...``. At a constant LR the norm settles at an equilibrium ||W|| ∝ sqrt(lr/wd): its log-log slope
against lr/wd must be 0.5 (the command fails, exit status 1, when a slope leaves 0.45-0.55; against sqrt(lr/wd) itself
the slope is 1). For AdamW the trajectories are drawn against the closed form sqrt(lr / (2 wd)): the Adam update,
summed over its momentum's memory, is a random walk of unit steps times lr, pulled back by lr*wd per step, whose
stationary variance is lr^2 / (2 lr wd). Holds while lr*wd is well below 1 - beta1 (the momentum's memory).

``model=<preset>`` picks the model as the trainer's model group does (tiny, tiny_deep, falcon_h1_0p5b, width_128 ...
width_8192, or a YAML file of configs/model), and ``model.<field>=...`` changes one of its fields.

``run=<run dir>`` also overlays a finished run's matrix norms (``norm/...``) on the ABM prediction the trainer logged
for it (``abm/...``) and its multipliers (``lrm/...``): the paper finds that matrices follow ABM and multipliers do not.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from lrm_train.experiments.analysis import power_law_fit
from lrm_train.experiments.experiment import Experiment, ExperimentFailed, ExperimentSettings
from lrm_train.experiments.report import markdown_table, save_figure, write_report
from lrm_train.experiments.results import read_metrics
from lrm_train.experiments.runner import create_out_dir
from lrm_train.models import FalconH1Config, FalconH1LM, preset
from lrm_train.optim import OptimConfig, OptimizerName, build_optimizer, classify_parameters, set_learning_rates
from lrm_train.train.metrics import ABM_KEY, MULTIPLIER_KEY, NORM_KEY, AdamBrownianMotion, matrix_init_stds

SLOPE_RANGE = (0.45, 0.55)
_TRAJECTORY_POINTS = 200  # points kept per trajectory for the plot


@dataclass
class ABMSettings(ExperimentSettings):
    out_dir: str = "experiments/abm"
    # The shapes and parameter groups the optimizer is built for: an option of the trainer's model group.
    model: FalconH1Config = field(default_factory=lambda: preset("tiny"))
    optimizers: list[str] = field(default_factory=lambda: ["adamw", "muon"])
    # The sweep: lr/wd over these ratios at each of these lr*wd products (lr = sqrt(p r), wd = sqrt(p / r)).
    # Products well below 1 - beta1 (the momentum's memory) keep the closed form valid.
    ratios: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0])
    products: list[float] = field(default_factory=lambda: [1e-3, 4e-3])
    # Steps per point, in units of the equilibration time 1/(lr*wd); the equilibrium is the mean over the last one.
    timescales: float = 3.0
    seed: int = 0
    run: str | None = None  # a finished run directory to overlay on its ABM prediction

    def __post_init__(self) -> None:
        super().__post_init__()
        # Checked before any work: the sweep takes square roots and logs of these values and divides by them.
        if not self.optimizers:
            raise ValueError(f"optimizers=[] must name at least one of {', '.join(OptimizerName)}")
        unknown = [name for name in self.optimizers if name not in set(OptimizerName)]
        if unknown:
            raise ValueError(f"optimizers: {unknown[0]!r} is not one of {', '.join(OptimizerName)}")
        if any(r <= 0 for r in self.ratios):
            raise ValueError(f"ratios={self.ratios}: every lr/wd ratio must be > 0")
        if any(p <= 0 for p in self.products):
            raise ValueError(f"products={self.products}: every lr*wd product must be > 0")
        if len(set(self.ratios)) < 2:
            raise ValueError(f"ratios={self.ratios}: the slope against lr/wd needs 2 different ratios or more")
        points = len(self.ratios) * len(self.products)
        if points < 3:
            raise ValueError(
                f"ratios x products: the slope's confidence interval needs 3 points or more per optimizer, got {points}"
            )
        if self.timescales <= 0:
            raise ValueError(f"timescales={self.timescales} must be > 0")


def simulate(model: FalconH1LM, optimizer_name: str, lr: float, wd: float, timescales: float, seed: int) -> dict:
    """ABM of every shadow the trainer would keep for this model under (lr, wd): trajectories and equilibria."""
    cfg = OptimConfig(name=OptimizerName(optimizer_name), lr=lr, weight_decay=wd)
    optimizer = build_optimizer(model, classify_parameters(model), cfg)
    set_learning_rates(optimizer, lr)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    abm = AdamBrownianMotion(optimizer, cfg, shapes, matrix_init_stds(model), seed)
    # A shadow follows its group, whose LR and WD a muP parametrization scales (their product stays lr * wd).
    group_lr_wd = dict(zip(abm.shadows, abm.hyperparameters()))
    steps = math.ceil(timescales / (lr * wd))
    every = max(1, steps // _TRAJECTORY_POINTS)
    window_start = steps - math.ceil(steps / timescales)
    trajectories: dict[str, list[float]] = {}
    squares: dict[str, float] = {}
    for step in range(1, steps + 1):
        abm.step()
        if step % every and step <= window_start:
            continue
        for name, norm in abm.norms().items():
            value = float(norm)
            if step % every == 0:
                trajectories.setdefault(name, []).append(value)
            if step > window_start:
                squares[name] = squares.get(name, 0.0) + value**2
    equilibrium = {name: math.sqrt(total / (steps - window_start)) for name, total in squares.items()}
    closed_form = {name: math.sqrt(lr / (2 * wd)) for name, (lr, wd) in group_lr_wd.items()}
    return dict(
        steps=steps,
        every=every,
        trajectories=trajectories,
        equilibrium=equilibrium,
        group_lr_wd=group_lr_wd,
        closed_form=closed_form,
    )


def sweep(settings: ABMSettings) -> list[dict]:
    model = FalconH1LM(settings.model)
    points = []
    for name in settings.optimizers:
        for product in settings.products:
            for ratio in settings.ratios:
                lr, wd = math.sqrt(product * ratio), math.sqrt(product / ratio)
                print(f"abm: {name} lr={lr:.4g} wd={wd:.4g}", flush=True)
                points.append(
                    dict(
                        optimizer=name,
                        lr=lr,
                        wd=wd,
                        **simulate(model, name, lr, wd, settings.timescales, settings.seed),
                    )
                )
    return points


def slopes(points: list[dict]) -> list[dict]:
    """Per optimizer and shadow: the log-log slope of the equilibrium norm against lr/wd, with its CI."""
    rows = []
    for name in dict.fromkeys(p["optimizer"] for p in points):
        mine = [p for p in points if p["optimizer"] == name]
        for shadow in mine[0]["equilibrium"]:
            ratio = [p["lr"] / p["wd"] for p in mine]
            fit = power_law_fit(ratio, [p["equilibrium"][shadow] for p in mine])
            ok = SLOPE_RANGE[0] <= fit["exponent"] <= SLOPE_RANGE[1]
            rows.append(dict(optimizer=name, shadow=shadow, **fit, within_range=ok))
    return rows


def plot_equilibria(points: list[dict], out_dir: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in dict.fromkeys(p["optimizer"] for p in points):
        mine = [p for p in points if p["optimizer"] == name]
        for shadow in mine[0]["equilibrium"]:
            s = [math.sqrt(lr / wd) for p in mine for lr, wd in [p["group_lr_wd"][shadow]]]
            ax.loglog(s, [p["equilibrium"][shadow] for p in mine], "o", label=f"{name} {shadow}", alpha=0.7)
    s = sorted({math.sqrt(lr / wd) for p in points for lr, wd in p["group_lr_wd"].values()})
    ax.loglog(s, [v / math.sqrt(2) for v in s], "k--", label="sqrt(lr/(2 wd)) (AdamW closed form)")
    ax.set_xlabel("sqrt(lr / wd) of the shadow's group")
    ax.set_ylabel("equilibrium ||W|| (RMS)")
    ax.set_title("ABM equilibrium norm")
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir / "abm_equilibrium.png")


def plot_adamw_trajectories(points: list[dict], out_dir: Path) -> str | None:
    adamw = [p for p in points if p["optimizer"] == "adamw"]
    if not adamw:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, p in enumerate(adamw):
        shadow = next(iter(p["trajectories"]))
        norms = p["trajectories"][shadow]
        time = [(k + 1) * p["every"] * p["lr"] * p["wd"] for k in range(len(norms))]
        line = ax.semilogy(time, norms, color=f"C{i % 10}", label=f"lr={p['lr']:g} wd={p['wd']:g}")[0]
        ax.axhline(p["closed_form"][shadow], color=line.get_color(), ls="--", lw=0.8)
    ax.set_xlabel("step x lr x wd (equilibration times)")
    ax.set_ylabel(f"||W|| of the {shadow} shadow (RMS)")
    ax.set_title("AdamW ABM trajectories; dashed: sqrt(lr / (2 wd))")
    ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, out_dir / "abm_trajectories_adamw.png")


def overlay_records(run_dir: Path) -> list[dict]:
    """The records of a run's metrics that carry the trainer's ABM prediction."""
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise ValueError(f"run={run_dir}: no metrics.jsonl there (is it a run directory?)")
    records = [r for r in read_metrics(run_dir) if any(k.startswith(ABM_KEY) for k in r)]
    if not records:
        raise ValueError(f"run={run_dir}: metrics.jsonl has no abm/ values (run with logging.trajectories=true)")
    return records


def run_overlay(run_dir: Path, records: list[dict], out_dir: Path) -> dict:
    """A run's matrix norms and multipliers against the ABM prediction the trainer logged beside them."""
    steps = [r["step"] for r in records]
    last = records[-1]
    fig, ax = plt.subplots(figsize=(7, 5))
    for key in sorted(k for k in last if k.startswith(NORM_KEY)):
        ax.semilogy(steps, [r.get(key) for r in records], color="0.6", lw=0.6)
    for key in sorted(k for k in last if k.startswith(MULTIPLIER_KEY) and k.endswith("/mean")):
        ax.semilogy(steps, [abs(r.get(key)) for r in records], color="C1", lw=0.6, alpha=0.6)
    for i, key in enumerate(sorted(k for k in last if k.startswith(ABM_KEY))):
        ax.semilogy(steps, [r.get(key) for r in records], color=f"C{i + 2}", lw=2, ls="--", label=key)
    ax.plot([], [], color="0.6", label="norm/<matrix> (grey)")
    ax.plot([], [], color="C1", label="|lrm/<multiplier>/mean| (orange)")
    ax.set_xlabel("step")
    ax.set_ylabel("RMS norm / multiplier value")
    ax.set_title(f"{run_dir.name}: matrix norms and multipliers against ABM")
    ax.legend(fontsize=7)
    figure = save_figure(fig, out_dir / "abm_run_overlay.png")
    ratios = {}
    for key in (k for k in last if k.startswith(NORM_KEY)):
        matrix_abm = [v for k, v in last.items() if k.startswith(ABM_KEY)]
        ratios[key] = last[key] / (sum(matrix_abm) / len(matrix_abm))
    return dict(run_dir=str(run_dir), step=last["step"], figure=figure, norm_over_abm_mean=ratios)


def plan(settings: ABMSettings) -> list:
    """No training runs: the sweep simulates the optimizers' updates on the model's shapes in the report. A run to
    overlay is read here, so that a bad run directory fails before any work."""
    if settings.run:
        overlay_records(Path(settings.run))
    return []


def report(settings: ABMSettings, _runs: list) -> Path:
    torch.set_num_threads(1)  # 64x64 steps: threads only contend (x20 slower on 2 shared cores)
    records = overlay_records(Path(settings.run)) if settings.run else None
    out_dir = create_out_dir(settings.out_dir)
    overlay = run_overlay(Path(settings.run), records, out_dir) if records else None
    points = sweep(settings)
    fits = slopes(points)
    figures = [plot_equilibria(points, out_dir), plot_adamw_trajectories(points, out_dir)]
    path = write_report(
        out_dir,
        "Adam Brownian motion",
        _markdown(settings, points, fits, figures, overlay),
        _data(settings, points, fits, overlay),
    )
    failed = [f for f in fits if not f["within_range"]]
    for f in fits:
        print(
            f"abm: {f['optimizer']} {f['shadow']}: slope {f['exponent']:.3f} (95% CI {f['ci95'][0]:.3f}..{f['ci95'][1]:.3f})"
        )
    if failed:
        names = ", ".join(f"{f['optimizer']} {f['shadow']} {f['exponent']:.3f}" for f in failed)
        raise ExperimentFailed(f"ABM slope outside {SLOPE_RANGE[0]}-{SLOPE_RANGE[1]}: {names} (see {path})")
    return path


def _data(settings, points, fits, overlay) -> dict:
    table = [
        dict(
            optimizer=p["optimizer"],
            lr=p["lr"],
            wd=p["wd"],
            steps=p["steps"],
            equilibrium=p["equilibrium"],
            closed_form_adamw=p["closed_form"],  # per shadow, from its group's LR and WD
        )
        for p in points
    ]
    return dict(
        settings=dataclasses.asdict(settings), slope_range=SLOPE_RANGE, slopes=fits, points=table, run_overlay=overlay
    )


def _markdown(settings, points, fits, figures, overlay) -> str:
    slope_rows = [
        [
            f["optimizer"],
            f["shadow"],
            f["exponent"],
            f"{f['ci95'][0]:.3f}..{f['ci95'][1]:.3f}",
            "yes" if f["within_range"] else "NO",
        ]
        for f in fits
    ]
    point_rows = []
    for p in points:
        for shadow, value in p["equilibrium"].items():
            closed = p["closed_form"][shadow]
            point_rows.append(
                [
                    p["optimizer"],
                    p["lr"],
                    p["wd"],
                    shadow,
                    value,
                    closed if p["optimizer"] == "adamw" else "-",
                    value / closed,
                ]
            )
    m = settings.model
    text = f"""
N(0, 1) gradients fed to the trainer's optimizer (built for a model {m.hidden_size} wide, {m.num_hidden_layers} layers,
vocabulary {m.vocab_size}), constant LR, {settings.timescales:g} equilibration times 1/(lr*wd) per point; the
equilibrium is the RMS norm averaged over the last one.

## Log-log slope of the equilibrium norm against lr/wd

Expected 0.5, i.e. ||W|| ∝ sqrt(lr/wd); accepted {SLOPE_RANGE[0]}-{SLOPE_RANGE[1]}.

{markdown_table(["optimizer", "shadow", "slope", "95% CI", "in range"], slope_rows)}

![equilibria]({figures[0]})
"""
    if figures[1]:
        text += f"\n![AdamW trajectories]({figures[1]})\n"
    text += "\n## Every point\n\n" + markdown_table(
        ["optimizer", "lr", "wd", "shadow", "equilibrium", "sqrt(lr/(2wd))", "ratio to closed form"], point_rows
    )
    if overlay:
        text += f"\n\n## Run {overlay['run_dir']} (step {overlay['step']})\n\n![overlay]({overlay['figure']})\n\n"
        text += markdown_table(
            ["matrix", "norm / mean ABM prediction"], [[k, v] for k, v in sorted(overlay["norm_over_abm_mean"].items())]
        )
    return text


ABM = Experiment("abm", ABMSettings, plan, report, __doc__)
run, main = ABM.run, ABM.main


if __name__ == "__main__":
    sys.exit(main())
