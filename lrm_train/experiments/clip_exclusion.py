"""The paper's clipping ablation (§4.3, Fig. 6): leave the multipliers out of the clipped gradient norm, or not?

    python -m lrm_train.experiments.clip_exclusion [experiment=clip_exclusion_gpu] [key=value ...]

Two arms over the same seeds, everything else equal: ``excluded`` (``train.clip_multipliers=false``, the paper's and
the trainer's default) and ``included`` (``true``). A multiplier sums its gradient over a whole row or column, so
the multipliers' gradient norm can dominate a global norm that holds it; the paper found that clipping on such a norm
throttles the matrices early in training. Every run logs every step (``grad_norm``: the norm clipping compares with
``train.grad_clip``; ``grad_norm_multipliers``: the multipliers' own). The report gives, per arm, the fraction of
steps clipped in the first ``early_steps`` steps and after them, the factor the clip applied to the matrices'
gradients, the multipliers' share of the squared gradient norm, and the final validation loss of ``included`` minus
``excluded`` paired by seed, with its 95% t-interval over the seeds.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lrm_train.experiments.experiment import Experiment, ExperimentSettings, finished
from lrm_train.experiments.report import markdown_table, new_figure, save_figure, write_report
from lrm_train.experiments.results import ARM_BETTER, BASELINE_BETTER, UNRESOLVED, paired_gap, read_metrics
from lrm_train.experiments.runner import RunSpec, create_out_dir, make_run

ARMS = {"excluded": False, "included": True}  # arm -> train.clip_multipliers


@dataclass
class ClipExclusionSettings(ExperimentSettings):
    out_dir: str = "experiments/clip_exclusion"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    grad_clip: float = 1.0  # train.grad_clip of every run (the paper's 1.0)
    early_steps: int = 50  # "early": the first steps, where the paper saw the multipliers' gradients dominate
    trainer: list[str] = field(default_factory=list)  # the model (with multipliers), data, LR and length

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds}: the paired interval needs 2 distinct seeds or more")
        if self.grad_clip <= 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be > 0 (the ablation is about what clipping holds)")
        if self.early_steps < 1:
            raise ValueError(f"early_steps={self.early_steps} must be >= 1")


def plan(settings: ClipExclusionSettings) -> list[RunSpec]:
    runs = []
    for arm, include in ARMS.items():
        for seed in settings.seeds:
            overrides = [
                *settings.trainer,
                f"train.grad_clip={settings.grad_clip}",
                f"train.clip_multipliers={str(include).lower()}",
                "train.log_every=1",  # every step's norms: the clipped fraction counts steps
            ]
            run = make_run(
                f"clip_{arm}_s{seed}", Path(settings.out_dir) / "runs" / f"{arm}_s{seed}", overrides, seed=seed
            )
            if run.cfg.lrm.placement == "none":
                raise ValueError("trainer: the model has no multipliers (lrm=none): there is nothing to exclude")
            if run.cfg.train.max_steps <= settings.early_steps:
                raise ValueError(
                    f"early_steps={settings.early_steps} leaves no late steps in a run of "
                    f"train.max_steps={run.cfg.train.max_steps}"
                )
            run.labels.update(arm=arm)
            runs.append(run)
    return runs


def step_values(records: list[dict], grad_clip: float, include: bool) -> list[dict]:
    """Per logged step: the clipped norm, the multipliers' norm, the full norm, whether the step was clipped and the
    factor the clip applied to the matrices' gradients (the trainer's ``clipped_norm``: max_norm / (norm + 1e-6))."""
    out = []
    for r in records:
        if "grad_norm" not in r:
            continue
        clipped, mult = r["grad_norm"], r["grad_norm_multipliers"]
        full = clipped if include else (clipped**2 + mult**2) ** 0.5
        out.append(
            dict(
                step=r["step"],
                loss=r["loss"],
                grad_norm=clipped,
                multipliers=mult,
                full=full,
                clipped=clipped > grad_clip,
                matrix_factor=min(1.0, grad_clip / (clipped + 1e-6)),
                multiplier_share=mult**2 / full**2 if full > 0 else 0.0,
            )
        )
    return out


def summarize(steps: list[dict], early_steps: int) -> dict:
    """Means of the clip statistics over the early steps and the late ones."""
    out = {}
    for phase, chosen in (
        ("early", [s for s in steps if s["step"] <= early_steps]),
        ("late", [s for s in steps if s["step"] > early_steps]),
    ):
        out[phase] = dict(
            steps=len(chosen),
            clipped_fraction=statistics.fmean(s["clipped"] for s in chosen),
            matrix_factor=statistics.fmean(s["matrix_factor"] for s in chosen),
            multiplier_share=statistics.fmean(s["multiplier_share"] for s in chosen),
        )
    return out


def final_val_loss(records: list[dict]) -> float:
    return [r["val_loss"] for r in records if "val_loss" in r][-1]


def report(settings: ClipExclusionSettings, runs: list[RunSpec]) -> Path:
    out_dir = create_out_dir(settings.out_dir)
    per_run = {}
    for run in finished(runs):
        arm, seed = run.labels["arm"], run.labels["seed"]
        records = read_metrics(run.run_dir)
        steps = step_values(records, settings.grad_clip, ARMS[arm])
        per_run[(arm, seed)] = dict(
            steps=steps, summary=summarize(steps, settings.early_steps), final=final_val_loss(records)
        )

    arms = {}
    for arm in ARMS:
        seeds = [per_run[(arm, s)] for s in settings.seeds]
        arms[arm] = {
            phase: {
                key: statistics.fmean(r["summary"][phase][key] for r in seeds)
                for key in ("clipped_fraction", "matrix_factor", "multiplier_share")
            }
            for phase in ("early", "late")
        }
        arms[arm]["final_val_loss"] = statistics.fmean(r["final"] for r in seeds)
    finals = {arm: {s: per_run[(arm, s)]["final"] for s in settings.seeds} for arm in ARMS}
    gap = paired_gap(finals["included"], finals["excluded"])
    gaps, mean_gap, ci95 = gap["per_seed"], gap["mean"], gap["ci95"] or [math.nan, math.nan]
    verdict = {
        ARM_BETTER: "including the multipliers is better",
        BASELINE_BETTER: "excluding the multipliers is better",
        UNRESOLVED: UNRESOLVED,
        None: "one finite seed: no interval",
    }[gap["verdict"]]

    fig, (norm_ax, loss_ax) = new_figure(2, f"clipping at {settings.grad_clip:g}: multipliers in the norm or not")
    colors = {"excluded": "tab:blue", "included": "tab:orange"}
    for arm in ARMS:
        runs_of_arm = [per_run[(arm, s)]["steps"] for s in settings.seeds]
        count = min(len(r) for r in runs_of_arm)
        x = [r["step"] for r in runs_of_arm[0][:count]]

        def mean_of(key: str, runs_of_arm=runs_of_arm, count=count) -> list[float]:
            return [statistics.fmean(r[i][key] for r in runs_of_arm) for i in range(count)]

        norm_ax.semilogy(x, mean_of("grad_norm"), color=colors[arm], label=f"{arm}: clipped norm")
        loss_ax.plot(x, mean_of("loss"), color=colors[arm], label=arm)
        if arm == "excluded":  # the multipliers' norm is the same quantity in both arms; one curve shows it
            norm_ax.semilogy(x, mean_of("multipliers"), color="tab:green", label="multipliers' norm (excluded arm)")
    norm_ax.axhline(settings.grad_clip, color="k", linestyle="--", label=f"train.grad_clip = {settings.grad_clip:g}")
    norm_ax.axvline(settings.early_steps, color="grey", linestyle=":")
    norm_ax.set(xlabel="step", ylabel="gradient norm (mean over seeds)")
    loss_ax.set(xlabel="step", ylabel="training loss (mean over seeds)")
    norm_ax.legend(fontsize=7)
    loss_ax.legend()
    figure = save_figure(fig, out_dir / "clip_exclusion.png")

    rows = [
        [arm, phase, v[phase]["clipped_fraction"], v[phase]["matrix_factor"], v[phase]["multiplier_share"]]
        for arm, v in arms.items()
        for phase in ("early", "late")
    ]
    seed_rows = [
        [s, per_run[("excluded", s)]["final"], per_run[("included", s)]["final"], g]
        for s, g in zip(settings.seeds, gaps)
    ]
    text = f"""
Arms: `excluded` (`train.clip_multipliers=false`, the paper's) and `included` (`true`), clipping at
`train.grad_clip={settings.grad_clip:g}`, seeds {settings.seeds}; "early" is steps 1-{settings.early_steps}, "late"
the rest. Every run: {settings.trainer}.

![gradient norms and loss]({figure})

## Clipping per arm (means over steps, then over seeds)

The matrix factor is what the clip multiplied the matrices' gradients by (1: not clipped); the multipliers' share is
their part of the full squared gradient norm.

{markdown_table(["arm", "phase", "fraction of steps clipped", "matrix factor", "multipliers' share"], rows)}

## Final validation loss, paired by seed

included - excluded: **{mean_gap:+.4f}** (95% CI {ci95[0]:+.4f}..{ci95[1]:+.4f}, {len(gaps)} seeds): {verdict}.

{markdown_table(["seed", "excluded", "included", "included - excluded"], seed_rows)}
"""
    data = dict(
        settings=dataclasses.asdict(settings),
        arms=arms,
        gap=dict(mean=mean_gap, ci95=ci95, per_seed=gaps, verdict=verdict),
        runs=[
            dict(arm=arm, seed=seed, final_val_loss=r["final"], **r["summary"]) for (arm, seed), r in per_run.items()
        ],
    )
    path = write_report(out_dir, "Excluding the multipliers from the clipped norm", text, data)
    for arm, v in arms.items():
        print(
            f"clip_exclusion: {arm}: clipped {v['early']['clipped_fraction']:.0%} of early steps, "
            f"{v['late']['clipped_fraction']:.0%} of late ones; final val loss {v['final_val_loss']:.4f}"
        )
    print(f"clip_exclusion: included - excluded {mean_gap:+.4f} (95% CI {ci95[0]:+.4f}..{ci95[1]:+.4f}): {verdict}")
    return path


CLIP_EXCLUSION = Experiment("clip_exclusion", ClipExclusionSettings, plan, report, __doc__)
run, main = CLIP_EXCLUSION.run, CLIP_EXCLUSION.main


if __name__ == "__main__":
    sys.exit(main())
