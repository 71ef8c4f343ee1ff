"""The paper's projector experiment: sweep S = sqrt(lr/wd) of the LM head at a fixed sqrt(lr*wd).

    python -m lrm_train.experiments.norm_sweep [experiment=norm_sweep_gpu] [key=value ...] [force=true]

The LM head's LR and WD are set through its class multipliers so that sqrt(lr*wd) = ``effective_lr`` and
sqrt(lr/wd) = S for each S of ``scales``; everything else trains as usual. ABM puts the head's norm at
||W|| ≈ S/sqrt(2), so S moves the logits' scale unless something learnable can undo it. Arms (trainer overrides):
``frozen`` - no multipliers and frozen norm weights (``optim.norm.lr_mult=0``: AdamW's step, weight decay included,
is scaled by the LR, so a zero LR leaves the weights at 1); ``scalar`` - a learnable scalar on every matrix, the
head's included, norms frozen; ``vector`` - learnable norm weights, the final RMSNorm's being the head's column
multipliers. The paper: the frozen arm degrades at extreme S, the multiplier arms stay flat while ||W|| follows S,
so ||W_eff|| (the head with its multipliers) stays flat and the head's multiplier falls as S^-1.

A pre-flight (``preflight.py``) refuses, before any training, a design where the head does not reach its
equilibrium (wd·Σlr < 1) or where the head's multiplier (the scalar arm's ``lm_head.lrm_scalar``, the vector arm's
final norm weights) cannot travel from its start m0 to m0/S (Σlr < |m0/S - m0|), unless ``force=true``.
The sweep is meant to be centred on the frozen arm's optimum (S = 1), so that the multipliers' change is the S
range's and not the distance to a mis-set forward multiplier.

The report fits log-log slopes against S per arm with 95% intervals: a regression over the arm's runs (every S and
seed), since the extra seeds cover only the ends of the sweep.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lrm_train.experiments.analysis import final_weights, power_law_fit
from lrm_train.experiments.experiment import Experiment, ExperimentSettings, finished
from lrm_train.experiments.preflight import HEADER, Budget, budgets, refuse_short
from lrm_train.experiments.report import markdown_table, new_figure, save_figure, write_report
from lrm_train.experiments.results import last_logged, read_metrics
from lrm_train.experiments.runner import RunSpec, create_out_dir, make_run
from lrm_train.models import FalconH1LM
from lrm_train.train import compose
from lrm_train.train.metrics import ABM_KEY, MULTIPLIER_KEY, NORM_EFF_KEY, NORM_KEY

HEAD, HEAD_MULTIPLIERS, FINAL_NORM = "lm_head.weight", "lm_head.lrm_*", "final_layernorm.weight"


@dataclass
class NormSweepSettings(ExperimentSettings):
    out_dir: str = "experiments/norm_sweep"
    scales: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0])  # S = sqrt(lr/wd), centred
    # sqrt(lr*wd) of the head: 1/effective_lr^2 steps is the head's equilibration time, which the runs must exceed.
    effective_lr: float = 0.1
    arms: dict[str, list[str]] = field(
        default_factory=lambda: {
            "frozen": ["lrm=none", "optim.norm.lr_mult=0"],
            "scalar": ["lrm=scalar", "optim.norm.lr_mult=0"],
            "vector": ["lrm=none"],
        }
    )
    # Seeds of every run; and, per arm, more seeds at the sweep's two ends only (the loss's rise there is compared
    # with the spread between seeds).
    seeds: list[int] = field(default_factory=lambda: [0])
    end_seeds: dict[str, list[int]] = field(default_factory=dict)
    force: bool = False  # train a design the pre-flight finds short (the report still shows its table)
    trainer: list[str] = field(default_factory=list)  # the model, data and length of every run

    def __post_init__(self) -> None:
        super().__post_init__()
        # S and effective_lr set the head's lr and wd as their product and quotient, and S is fitted on logs.
        if not self.scales:
            raise ValueError("scales=[] must hold at least one S")
        if len(set(self.scales)) != len(self.scales):
            raise ValueError(f"scales={self.scales} must be distinct")
        if any(s <= 0 for s in self.scales):
            raise ValueError(f"scales={self.scales}: every S must be > 0")
        if self.effective_lr <= 0:
            raise ValueError(f"effective_lr={self.effective_lr} must be > 0")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} must be distinct and name at least one")
        for arm, seeds in self.end_seeds.items():
            if arm not in self.arms:
                raise ValueError(f"end_seeds: {arm!r} is not an arm ({', '.join(self.arms)})")
            if set(seeds) & set(self.seeds) or len(set(seeds)) != len(seeds):
                raise ValueError(f"end_seeds.{arm}={seeds} must be distinct and not among seeds={self.seeds}")


def head_overrides(settings: NormSweepSettings, scale: float, base_lr: float, base_wd: float) -> list[str]:
    lr, wd = settings.effective_lr * scale, settings.effective_lr / scale
    return [f"optim.lm_head.lr_mult={lr / base_lr}", f"optim.lm_head.wd_mult={wd / base_wd}"]


def run_name(arm: str, scale: float, seed: int) -> str:
    return f"{arm}_S{scale:g}" + (f"_s{seed}" if seed else "")


def plan(settings: NormSweepSettings) -> list[RunSpec]:
    """Every run composed before any trains (a bad key fails first), labelled by arm, S and seed; then the
    pre-flight."""
    base = compose(list(settings.trainer)).optim  # the base LR and WD that the class multipliers scale
    if base.weight_decay <= 0:
        raise ValueError(
            f"trainer: optim.weight_decay={base.weight_decay} must be > 0 here (the LM head's weight decay is set as "
            "a multiple of it)"
        )
    ends = {min(settings.scales), max(settings.scales)}
    runs = []
    for arm, arm_overrides in settings.arms.items():
        for scale in settings.scales:
            seeds = settings.seeds + (settings.end_seeds.get(arm, []) if scale in ends else [])
            for seed in seeds:
                name = run_name(arm, scale, seed)
                overrides = [
                    *settings.trainer,
                    *arm_overrides,
                    *head_overrides(settings, scale, base.lr, base.weight_decay),
                ]
                run_dir = Path(settings.out_dir) / "runs" / name
                runs.append(make_run(f"norm_sweep_{name}", run_dir, overrides, arm=arm, S=scale, seed=seed))
    refuse_short(preflight(runs), settings.force)
    return runs


def head_multiplier_start(run: RunSpec) -> float:
    """Where the head's first learnable multiplier starts: 1, or under ``lrm.init=mup`` the head's muP forward
    multiplier (its width scaling included), which it then carries in place of the fixed one."""
    if run.cfg.lrm.init != "mup":
        return 1.0
    with torch.device("meta"):  # the multiplier's value is a float the layer keeps: no weights needed
        return FalconH1LM(run.cfg.model, run.cfg.lrm).lm_head.mup_multiplier


def preflight(runs: list[RunSpec]) -> list[Budget]:
    """The head must equilibrate; a multiplier of the head's scale starting at m0 must be able to reach m0/S (the
    compensation of a head norm S times the centre's). The final norm's weights start at 1."""
    rows = []
    for run in runs:
        travel = {}
        if run.cfg.lrm.placement != "none":
            m0 = head_multiplier_start(run)
            travel[HEAD_MULTIPLIERS] = abs(m0 / run.labels["S"] - m0)
        if run.cfg.optim.norm.lr_mult > 0:
            travel[FINAL_NORM] = abs(1 / run.labels["S"] - 1)
        rows += budgets(run, [HEAD], travel)
    return rows


def final_values(run_dir: Path) -> dict:
    """The final validation loss and the LM head's norms from the run's metrics, and its multipliers from the final
    checkpoint: the learnable scalar (when it has one) and the RMS of the final norm's weights (the head's column
    multipliers). ``norm_eff`` is the head with every multiplier, the final norm's weights included."""
    last = last_logged(run_dir)
    weights = final_weights(run_dir)
    head, columns = weights[HEAD], weights[FINAL_NORM]
    column_gain = float((head * columns).pow(2).mean().sqrt() / head.pow(2).mean().sqrt())
    values = dict(
        val_loss=last["val_loss"],
        norm=last[f"{NORM_KEY}lm_head"],
        norm_eff=last[f"{NORM_EFF_KEY}lm_head"] * column_gain,
        final_norm_rms=float(columns.pow(2).mean().sqrt()),
    )
    if f"{MULTIPLIER_KEY}lm_head.lrm_scalar" in last:
        values["head_scalar"] = last[f"{MULTIPLIER_KEY}lm_head.lrm_scalar"]
    return values


# The slopes the report fits against S, per arm: the quantity's key in final_values and the paper's value (frozen
# arm / multiplier arms); None where the paper states none.
SLOPES = {
    "norm": ("‖W‖ of the head", 1.0, 1.0),
    "norm_eff": ("‖W_eff‖ of the head (with its multipliers)", 1.0, 0.0),
    "head_scalar": ("learned head scalar", None, -1.0),
    "final_norm_rms": ("final norm weights' RMS (head columns)", None, -1.0),
}


def analyse(settings: NormSweepSettings, results: list[dict]) -> dict:
    """The slopes and the loss at the sweep's ends from each run's final values (``results``: one dict per run with
    ``arm``, ``S``, ``seed`` and ``final_values``' keys)."""
    slopes = []
    for arm in settings.arms:
        runs = [r for r in results if r["arm"] == arm]
        for key, (label, frozen, multiplied) in SLOPES.items():
            points = [r for r in runs if key in r and r[key] != 0]
            # The frozen arm's norm weights stay at 1: their slope is 0 by construction, not a measurement.
            if len({r["S"] for r in points}) < 3 or (key == "final_norm_rms" and arm != "vector"):
                continue
            fit = power_law_fit([r["S"] for r in points], [r[key] for r in points])
            paper = frozen if arm == "frozen" else multiplied
            slopes.append(dict(arm=arm, quantity=key, label=label, paper=paper, **fit))
    ends = [end_losses(settings, arm, results) for arm in settings.arms]
    spread = {e["arm"]: dict(min=e["min_loss"], max=e["max_loss"], spread=e["max_loss"] - e["min_loss"]) for e in ends}
    return dict(slopes=slopes, ends=ends, spread=spread)


def end_losses(settings: NormSweepSettings, arm: str, results: list[dict]) -> dict:
    """The arm's loss at each end of the sweep above its minimum over S (the seeds' mean at each S), against the
    spread between seeds: the pooled standard deviation of the seeds at the S values that have two or more."""
    by_scale: dict[float, list[float]] = {}
    for r in results:
        if r["arm"] == arm:
            by_scale.setdefault(r["S"], []).append(r["val_loss"])
    means = {s: statistics.fmean(v) for s, v in by_scale.items()}
    replicated = [v for v in by_scale.values() if len(v) > 1]
    spread = (
        math.sqrt(sum(statistics.variance(v) * (len(v) - 1) for v in replicated) / sum(len(v) - 1 for v in replicated))
        if replicated
        else None
    )
    best = min(means, key=means.get)
    excess = {str(s): means[s] - means[best] for s in (min(means), max(means))}
    return dict(
        arm=arm,
        best_S=best,
        min_loss=means[best],
        max_loss=max(means.values()),
        excess=excess,
        seed_std=spread,
        excess_in_seed_std={s: (e / spread if spread else None) for s, e in excess.items()},
    )


def report(settings: NormSweepSettings, runs: list[RunSpec]) -> Path:
    out_dir = create_out_dir(settings.out_dir)
    runs = finished(runs)
    results = [dict(run.labels, **final_values(run.run_dir)) for run in runs]
    found = analyse(settings, results)
    checks = preflight(runs)
    overlay, found["norm_over_abm"] = plot_abm_overlay(settings, runs, out_dir)
    text = markdown(settings, results, found, checks, [plot_sweep(settings, results, out_dir), overlay])
    data = dict(
        settings=dataclasses.asdict(settings),
        preflight=[dataclasses.asdict(b) for b in checks],
        runs=results,
        **found,
    )
    path = write_report(out_dir, "Norm sweep (LM head)", text, data)
    for arm, v in found["spread"].items():
        print(f"norm_sweep: {arm}: final loss {v['min']:.3f}..{v['max']:.3f} across S (spread {v['spread']:.3f})")
    for fit in found["slopes"]:
        low, high = fit["ci95"]
        print(f"norm_sweep: {fit['arm']}: {fit['quantity']} ∝ S^{fit['exponent']:.2f} (95% CI {low:.2f}..{high:.2f})")
    return path


def _arm_points(results: list[dict], arm: str, key: str) -> tuple[list[float], list[float]]:
    points = sorted((r["S"], r[key]) for r in results if r["arm"] == arm and key in r)
    return [s for s, _ in points], [v for _, v in points]


def plot_sweep(settings: NormSweepSettings, results: list[dict], out_dir: Path) -> str:
    fig, axes = new_figure(4, f"LM-head norm sweep at sqrt(lr*wd) = {settings.effective_lr:g}")
    panels = [("val_loss", "final validation loss"), ("norm", "‖W‖ head (RMS)"), ("norm_eff", "‖W_eff‖ head (RMS)")]
    panels.append(("head_scalar", "head scalar / final norm RMS"))
    for ax, (key, label) in zip(axes, panels):
        for i, arm in enumerate(settings.arms):
            quantity = "final_norm_rms" if key == "head_scalar" and arm == "vector" else key
            x, y = _arm_points(results, arm, quantity)
            if x:
                plot = ax.semilogx if key == "val_loss" else ax.loglog
                plot(x, [abs(v) for v in y], "o", color=f"C{i}", label=arm)
        ax.set(xlabel="S = sqrt(lr/wd) of the LM head", ylabel=label)
    axes[1].loglog(settings.scales, [s / math.sqrt(2) for s in settings.scales], "k--", label="S/sqrt(2) (ABM)")
    axes[3].loglog(settings.scales, [1 / s for s in settings.scales], "k--", label="1/S (full compensation)")
    for ax in axes:
        ax.set_xticks(settings.scales, [f"{s:g}" for s in settings.scales])
        ax.tick_params(axis="x", which="minor", labelbottom=False)
        ax.legend(fontsize=7)
    return save_figure(fig, out_dir / "norm_sweep.png")


def plot_abm_overlay(settings: NormSweepSettings, runs: list[RunSpec], out_dir: Path) -> tuple[str, dict]:
    """Each arm's head norm over training (the first seed, every S) against the ABM prediction the trainer logged
    beside it for the same lr and wd: noise and weight decay alone. Also each run's final norm over ABM's."""
    ratios = {}
    fig, axes = new_figure(len(settings.arms), "‖W‖ of the LM head (solid) against ABM (dashed) over training")
    for ax, arm in zip(axes, settings.arms):
        for i, run in enumerate(r for r in runs if r.labels["arm"] == arm and r.labels["seed"] == settings.seeds[0]):
            records = read_metrics(run.run_dir)
            abm_key = next((k for r in records for k in r if k.startswith(f"{ABM_KEY}lm_head")), None)
            steps = [r["step"] for r in records if f"{NORM_KEY}lm_head" in r]
            ax.semilogy(steps, [r[f"{NORM_KEY}lm_head"] for r in records if f"{NORM_KEY}lm_head" in r], color=f"C{i}")
            if abm_key:
                abm_steps = [r["step"] for r in records if abm_key in r]
                ax.semilogy(abm_steps, [r[abm_key] for r in records if abm_key in r], "--", color=f"C{i}")
                final = [r for r in records if abm_key in r and f"{NORM_KEY}lm_head" in r][-1]
                ratios[run_name(arm, run.labels["S"], 0)] = final[f"{NORM_KEY}lm_head"] / final[abm_key]
            ax.plot([], [], color=f"C{i}", label=f"S={run.labels['S']:g}")
        ax.set(title=arm, xlabel="step", ylabel="RMS")
        ax.legend(fontsize=7)
    return save_figure(fig, out_dir / "norm_sweep_abm_overlay.png"), ratios


def markdown(settings, results, found, checks, figures) -> str:
    def ci(fit):
        return f"{fit['ci95'][0]:.2f}..{fit['ci95'][1]:.2f}"

    slope_rows = [
        [f["arm"], f["label"], f["exponent"], ci(f), f["n"], "-" if f["paper"] is None else f["paper"]]
        for f in found["slopes"]
    ]
    spread_rows = [[arm, v["min"], v["max"], v["spread"]] for arm, v in found["spread"].items()]
    end_rows = []
    for e in found["ends"]:
        for scale, excess in e["excess"].items():
            end_rows.append(
                [e["arm"], scale, e["best_S"], e["min_loss"], excess, e["seed_std"], e["excess_in_seed_std"][scale]]
            )
    rows = sorted(results, key=lambda r: (list(settings.arms).index(r["arm"]), r["S"], r["seed"]))
    run_rows = [
        [
            r["arm"],
            r["S"],
            r["seed"],
            r["val_loss"],
            r["norm"],
            r["norm_eff"],
            r.get("head_scalar"),
            r["final_norm_rms"],
        ]
        for r in rows
    ]
    return f"""
The LM head's sqrt(lr*wd) is fixed at {settings.effective_lr:g} while S = sqrt(lr/wd) sweeps {settings.scales}
(seeds {settings.seeds}; more seeds at the ends: {settings.end_seeds or "none"}); arms:
{", ".join(f"`{arm}` ({' '.join(o)})" for arm, o in settings.arms.items())}; every run: {settings.trainer}.

![norm sweep]({figures[0]})

## Slopes against S (log-log, 95% CI)

A least-squares fit over each arm's runs (every S and seed; the interval from the fit's residuals, Student's t;
3 values of S or more).
The paper: ‖W‖ ∝ S in every arm; ‖W_eff‖ ∝ S with frozen multipliers and flat with learnable ones, whose value
falls as 1/S. The vector arm's multiplier is the final norm's weights (every norm learns in that arm).

{markdown_table(["arm", "quantity", "slope", "95% CI", "runs", "paper"], slope_rows)}

## Spread of the final validation loss across S

The paper: the frozen arm degrades at extreme S, the multiplier arms stay flat (seeds averaged at each S).

{markdown_table(["arm", "min loss", "max loss", "spread (max - min)"], spread_rows)}

## Loss at the ends of the sweep

Each arm's loss at the smallest and largest S above its minimum over S (seeds averaged), against the seeds' spread
(pooled standard deviation where an S has two seeds or more). The review's test: the frozen arm more than 3 seed
standard deviations above its minimum at the ends, the multiplier arms within 2.

{markdown_table(["arm", "S", "best S", "min loss", "loss - min", "seed std", "in seed stds"], end_rows)}

## The head's norm over training against ABM

![ABM overlay]({figures[1]})

The final ‖W‖ over the ABM prediction at the same step (1: noise and weight decay alone set the norm):

{markdown_table(["run", "‖W‖ / ABM"], [[name, ratio] for name, ratio in found["norm_over_abm"].items()])}

## Pre-flight

Per run, the head's equilibration count wd·Σlr (needed: 1) and each learnable head multiplier's travel budget Σlr
against the change |m0/S - m0| it would need (see `preflight.py`).

{markdown_table(HEADER, [b.row() for b in checks])}

## Every run

{markdown_table(["arm", "S", "seed", "final val loss", "‖W‖ head", "‖W_eff‖ head", "head scalar", "final norm RMS"], run_rows)}
"""


NORM_SWEEP = Experiment("norm_sweep", NormSweepSettings, plan, report, __doc__)
run, main = NORM_SWEEP.run, NORM_SWEEP.main


if __name__ == "__main__":
    sys.exit(main())
