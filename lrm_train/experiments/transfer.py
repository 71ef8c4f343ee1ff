"""LR transfer: does the best learning rate found at one width stay the best at the others, as muP promises?

    python -m lrm_train.experiments.transfer [experiment=transfer_cpu] [parametrization=standard] [key=value ...]

For each optimizer of ``optimizers``, trains the width family (``lrm=none`` unless ``trainer`` says otherwise: the muP
baseline) at each width of ``widths`` and each of ``lr_points`` learning rates sqrt(2) apart around the optimizer's
centre ``lr_center.<optimizer>`` (lr_center * 2^(k/2)), under one ``parametrization``: ``mup``, ``standard`` (the
control: without muP the optimum should drift with the width) or ``mup_multiplier`` (``mup_multiplier_<optimizer>``,
the form derived for each run's optimizer). From the final validation loss of each run (a diverged run has none) it
checks, per optimizer:

- **transfer**: the best LR agrees across widths within one grid step: the spread K, max - min of the best LR's grid
  index over widths (in sqrt(2)-steps), is at most 1;
- **wider is better**: at the widest width's best LR and its grid neighbours, the loss does not rise from one width
  to the next wider one by more than ``loss_tolerance``.

Beside them the report gives, paired by seed, how each width's loss leans across the grid (its slope against log2 LR)
and how that lean changes with width, with 95% intervals: where the curves are flat near the optimum the best LR is
an argmin over noise, and the lean's change tells a drift the seeds resolve from one they do not (reported, not
checked).

The command exits 1 when K > 1 for an optimizer, when a width's best LR sits on the grid's edge (the optimum may lie
outside the grid, so agreement shows nothing: move ``lr_center.<optimizer>``), and when wider-is-better is violated
beyond ``loss_tolerance``: a wider model that trains worse near the optimum is the other symptom of a parametrization
that does not transfer, while a rise within the tolerance is run-to-run noise and passes.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from lrm_train.experiments.analysis import (
    SweepParametrization,
    check_sweep_choices,
    check_width_sweep,
    mean_interval,
    width_overrides,
)
from lrm_train.experiments.compare import check_lr_center, lr_grid
from lrm_train.experiments.experiment import Experiment, ExperimentFailed, ExperimentSettings, finished
from lrm_train.experiments.report import markdown_table, new_figure, save_figure, write_report
from lrm_train.experiments.results import collect, finite
from lrm_train.experiments.runner import DIVERGED, RunSpec, create_out_dir, make_run, run_status


@dataclass
class TransferSettings(ExperimentSettings):
    out_dir: str = "experiments/transfer/${parametrization}"  # one report per parametrization, side by side
    widths: list[int] = field(default_factory=lambda: [64, 128, 256])
    layers: int = 2
    head_dim: int = 32
    optimizers: list[str] = field(default_factory=lambda: ["adamw", "muon"])
    parametrization: SweepParametrization = SweepParametrization.mup
    # Each optimizer's grid centre (optim.lr: under muP the LR at the model's base width), the LR at which width 128
    # trains best, as muP tuning would pick it (the trainer's 3e-3 is the 0.5B model's). Muon: 1.2e-2 of 6e-3, 1.2e-2,
    # 2.4e-2 in 120-step runs. AdamW: 1.7e-2 of 1.2e-2..4.8e-2 in 100-step runs of 18 seeds since its epsilon scales
    # with the width (1.2e-2 before it; docs/results/transfer/mup_adamw_eps_scaled_18seeds).
    lr_center: dict[str, float] = field(default_factory=lambda: {"adamw": 1.7e-2, "muon": 1.2e-2})
    lr_points: int = 5  # LRs sqrt(2) apart around lr_center (an even count puts the extra point above it)
    steps: int = 100
    # Each (width, LR) point is the mean final loss over these seeds (a diverged seed makes the point diverged): one
    # 100-step run's loss moves by about 0.1 with the seed under AdamW, more than the LR's effect near the optimum.
    seeds: list[int] = field(default_factory=lambda: [0])
    loss_tolerance: float = 0.02  # a wider model's final loss may exceed the narrower one's by this much
    # Data, batch, schedule: the same for every run. lrm=none: the muP baseline, whose transfer this checks.
    trainer: list[str] = field(
        default_factory=lambda: [
            "lrm=none",
            "model.vocab_size=2048",
            "data.vocab_size=2048",
            "data.seq_len=64",
            "data.val_windows=64",
            "train.micro_batch_size=8",
            "train.log_every=10",
            "schedule=constant_exp_decay",
            "schedule.warmup_steps=12",
            "logging.trajectories=false",
        ]
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_width_sweep(self.widths, self.layers, self.head_dim, "the LR transfer check")
        self.parametrization = check_sweep_choices(self.parametrization, self.optimizers)
        check_lr_center(self.lr_center, self.optimizers)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={list(self.seeds)} must be distinct and name at least one")
        if self.lr_points < 2:
            raise ValueError(f"lr_points={self.lr_points} must be >= 2 (a best LR needs a grid to be best on)")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if self.loss_tolerance < 0:
            raise ValueError(f"loss_tolerance={self.loss_tolerance} must be >= 0")

    def grid(self, optimizer: str) -> list[float]:
        return lr_grid(self.lr_center[optimizer], self.lr_points)


def plan(settings: TransferSettings) -> list[RunSpec]:
    """Every (optimizer, width, LR) run, labelled by them and by the LR's grid index (the report's unit of spread)."""
    runs = []
    for optimizer in settings.optimizers:
        grid = settings.grid(optimizer)
        parametrization = settings.parametrization.for_optimizer(optimizer)
        for width, (index, lr), seed in itertools.product(settings.widths, enumerate(grid), settings.seeds):
            suffix = f"_s{seed}" if seed else ""
            name = f"transfer_{parametrization}_{optimizer}_w{width}_lr{lr:.3g}{suffix}"
            overrides = [
                *settings.trainer,  # first: the sweep's own keys below always win
                *width_overrides(width, settings.layers, settings.head_dim, parametrization),
                f"optim={optimizer}",
                f"optim.lr={lr!r}",
                f"train.max_steps={settings.steps}",
                f"train.eval_every={settings.steps}",
                f"train.ckpt_every={settings.steps}",
                "train.final_checkpoint=weights",  # read, never trained on: a third of the disk
                "logging.progress=false",
                "logging.wandb.mode=disabled",
            ]
            run_dir = Path(settings.out_dir) / "runs" / f"{optimizer}_w{width}_lr{lr:.3g}{suffix}"
            labels = dict(optimizer=optimizer, width=width, lr=lr, lr_index=index, parametrization=parametrization)
            runs.append(make_run(name, run_dir, overrides, seed=seed, **labels))
    return runs


def final_losses(runs: list[RunSpec], points: int) -> dict[tuple[str, int], list[float | None]]:
    """(optimizer, width) -> the final validation loss at each of the ``points`` grid indices, the mean over the seeds;
    None where a seed's run diverged. Every run must have ended: a diverged one is a result of the sweep (its LR is
    too high), a pending one is not."""
    finished([run for run in runs if run_status(run) != DIVERGED])
    by_seed: dict[tuple[str, int, int], list[float | None]] = {}
    for result in collect(runs):
        labels = result.run.labels
        point = (labels["optimizer"], labels["width"], labels["lr_index"])
        by_seed.setdefault(point, []).append(result.final if finite(result.final) else None)
    losses = {(run.labels["optimizer"], run.labels["width"]): [None] * points for run in runs}
    for (optimizer, width, index), values in by_seed.items():
        losses[optimizer, width][index] = None if None in values else sum(values) / len(values)
    return losses


def paired_rises(runs: list[RunSpec], optimizer: str, widths: list[int], lr_indices: list[int]) -> list[dict]:
    """At each grid index of ``lr_indices``, each width's final loss minus the next narrower one's, paired by seed
    (the two share the seed's data order): the mean rise with its 95% interval over the seeds that finished at both.
    Fewer than two such seeds: no row."""
    by_seed = _finals_by_seed(runs, optimizer)
    rows = []
    for index, (narrow, wide) in itertools.product(lr_indices, pairwise(sorted(widths))):
        before, after = by_seed.get((narrow, index), {}), by_seed.get((wide, index), {})
        rises = [after[seed] - before[seed] for seed in sorted(before.keys() & after.keys())]
        if len(rises) >= 2:
            mean, ci95 = mean_interval(rises)
            rows.append(dict(lr_index=index, narrower=narrow, wider=wide, rise=mean, ci95=ci95, seeds=len(rises)))
    return rows


def _finals_by_seed(runs: list[RunSpec], optimizer: str) -> dict[tuple[int, int], dict[int, float]]:
    """(width, grid index) -> seed -> final validation loss, for the optimizer's runs that did not diverge."""
    by_seed: dict[tuple[int, int], dict[int, float]] = {}
    for result in collect([r for r in runs if r.labels["optimizer"] == optimizer]):
        labels = result.run.labels
        if finite(result.final):
            by_seed.setdefault((labels["width"], labels["lr_index"]), {})[labels["seed"]] = result.final
    return by_seed


def lr_preference(runs: list[RunSpec], optimizer: str, widths: list[int], points: int) -> dict:
    """Which way each width's loss leans across the LR grid, and whether that lean changes with width, seed by seed.

    The best LR per width is an argmin over noisy means, so a spread of two steps can be noise where the curves are
    flat. Per seed and width, the least-squares slope of the final loss against log2(LR) over the whole grid (seeds
    with a diverged point at that width left out) measures the lean: negative where the grid's higher LRs train
    better. Its change from each width to the next, paired by seed, with a 95% interval, is the drift of the optimum
    that transfer excludes: below zero the wider model prefers higher LRs, above zero lower (standard
    parametrization's drift). Fewer than two seeds: no row."""
    by_seed = _finals_by_seed(runs, optimizer)
    log2_lr = [index / 2 for index in range(points)]  # the grid is sqrt(2) apart: half a doubling per index
    centre = sum(log2_lr) / points
    spread = sum((x - centre) ** 2 for x in log2_lr)
    slopes: dict[int, dict[int, float]] = {}
    for width in widths:
        seeds = set.intersection(*(set(by_seed.get((width, i), {})) for i in range(points)))
        slopes[width] = {
            seed: sum((x - centre) * by_seed[width, i][seed] for i, x in enumerate(log2_lr)) / spread
            for seed in sorted(seeds)
        }
    per_width = []
    for width in sorted(widths):
        if len(slopes[width]) >= 2:
            mean, ci95 = mean_interval(list(slopes[width].values()))
            per_width.append(dict(width=width, slope=mean, ci95=ci95, seeds=len(slopes[width])))
    changes = []
    for narrow, wide in pairwise(sorted(widths)):
        shared = sorted(slopes[narrow].keys() & slopes[wide].keys())
        if len(shared) >= 2:
            mean, ci95 = mean_interval([slopes[wide][seed] - slopes[narrow][seed] for seed in shared])
            changes.append(dict(narrower=narrow, wider=wide, change=mean, ci95=ci95, seeds=len(shared)))
    return dict(per_width=per_width, changes=changes)


def best_index(losses: list[float | None]) -> int | None:
    """The grid index of the lowest finite loss; None when every run diverged."""
    indices = [i for i, loss in enumerate(losses) if loss is not None]
    return min(indices, key=lambda i: losses[i]) if indices else None


def analyze(losses: dict[int, list[float | None]], grid: list[float], tolerance: float) -> dict:
    """Both checks for one optimizer from ``losses`` (width -> loss per grid index)."""
    widths = sorted(losses)
    best = {w: best_index(losses[w]) for w in widths}
    known = [i for i in best.values() if i is not None]
    spread = max(known) - min(known) if len(known) == len(widths) else None
    widest = best[widths[-1]]
    near = [] if widest is None else [i for i in (widest - 1, widest, widest + 1) if 0 <= i < len(grid)]
    violations = []
    for i in near:
        for narrow, wide in pairwise(widths):
            before, after = _or_inf(losses[narrow][i]), _or_inf(losses[wide][i])
            if after - before > tolerance:  # a diverged wider run rises without bound; both diverged: nan, no rise
                rise = after - before if math.isfinite(after) else None
                violations.append(dict(lr=grid[i], narrower=narrow, wider=wide, rise=rise))
    at_grid_edge = [w for w in widths if best[w] in (0, len(grid) - 1)]
    return dict(
        best_index=best,
        best_lr={w: None if best[w] is None else grid[best[w]] for w in widths},
        spread=spread,
        at_grid_edge=at_grid_edge,
        near_lrs=[grid[i] for i in near],
        violations=violations,
        # An optimum on the grid's edge may lie outside it: agreement there shows nothing.
        transfers=spread is not None and spread <= 1 and not at_grid_edge,
        wider_is_better=not violations and widest is not None,
    )


def _or_inf(loss: float | None) -> float:
    return math.inf if loss is None else loss


def transfer_line(optimizer: str, result: dict) -> str:
    best = ", ".join(f"{w}: {'diverged' if lr is None else f'{lr:.3g}'}" for w, lr in result["best_lr"].items())
    spread = "unknown (every LR diverged at a width)" if result["spread"] is None else result["spread"]
    edge = result["at_grid_edge"]
    at = ", ".join(map(str, edge))
    inconclusive = f" (on the grid's edge at width {at}: inconclusive, move lr_center.{optimizer})" if edge else ""
    return f"LR transfer ({optimizer}): best LR per width {{{best}}}; spread {spread} sqrt(2)-steps{inconclusive}"


def wider_line(optimizer: str, result: dict, tolerance: float) -> str:
    if not result["near_lrs"]:
        return f"Wider is better ({optimizer}): unknown (every LR diverged at the widest width)"
    near = ", ".join(f"{lr:.3g}" for lr in result["near_lrs"])
    if result["wider_is_better"]:
        return f"Wider is better ({optimizer}): holds at LR {near} (no loss rise over {tolerance:g} with width)"
    rises = "; ".join(
        f"w{v['narrower']}->w{v['wider']} at LR {v['lr']:.3g} "
        + ("diverged" if v["rise"] is None else f"+{v['rise']:.3f}")
        for v in result["violations"]
    )
    count = len(result["violations"])
    return f"Wider is better ({optimizer}): {count} violation{'s' * (count != 1)} beyond {tolerance:g}: {rises}"


def preference_text(preference: dict) -> str:
    interval = "{0:+.3f}..{1:+.3f}".format
    rows = [[f"w{r['width']}", f"{r['slope']:+.3f}", interval(*r["ci95"]), r["seeds"]] for r in preference["per_width"]]
    text = (
        "Slope of the final loss against log2(LR) over the whole grid, per seed (negative: the grid's higher LRs "
        "train better), and its change with width paired by seed (transfer means none; negative: the wider model "
        "prefers higher LRs):\n\n"
        + markdown_table(["width", "mean slope per LR doubling", "95% CI over seeds", "seeds"], rows)
        + "\n"
    )
    if preference["changes"]:
        rows = [
            [f"w{r['narrower']} -> w{r['wider']}", f"{r['change']:+.3f}", interval(*r["ci95"]), r["seeds"]]
            for r in preference["changes"]
        ]
        text += "\n" + markdown_table(["widths", "change of the slope", "95% CI over seeds", "seeds"], rows) + "\n"
    return text


def plot(optimizer: str, losses: dict[int, list[float | None]], grid: list[float], result: dict, out_dir: Path) -> str:
    fig, [ax] = new_figure(1, f"LR transfer, {optimizer}: final validation loss against LR")
    for i, width in enumerate(sorted(losses)):
        values = [math.nan if loss is None else loss for loss in losses[width]]  # a diverged run leaves a gap
        ax.plot(grid, values, "o-", color=f"C{i}", label=f"width {width}")
        if (best := result["best_index"][width]) is not None:
            ax.plot([grid[best]], [values[best]], "*", color=f"C{i}", markersize=14)
    ax.set_xscale("log", base=2)
    ax.set_xticks(grid, [f"{lr:.3g}" for lr in grid], minor=False)
    ax.minorticks_off()
    ax.set(xlabel="optim.lr", ylabel="final validation loss")
    ax.legend(fontsize=8, title="star: best LR", title_fontsize=8)
    return save_figure(fig, out_dir / f"transfer_{optimizer}.png")


def report(settings: TransferSettings, runs: list[RunSpec]) -> Path:
    out_dir = create_out_dir(settings.out_dir)
    grids = {o: settings.grid(o) for o in settings.optimizers}
    losses = final_losses(runs, settings.lr_points)
    by_optimizer = {o: {w: losses[(o, w)] for w in sorted(settings.widths)} for o in settings.optimizers}
    results = {o: analyze(by_optimizer[o], grids[o], settings.loss_tolerance) for o in settings.optimizers}
    lines = {o: (transfer_line(o, r), wider_line(o, r, settings.loss_tolerance)) for o, r in results.items()}
    centres = ", ".join(f"{o} {settings.lr_center[o]:g}" for o in settings.optimizers)

    text = f"""
Parametrization `{settings.parametrization}`; widths {sorted(settings.widths)}, {settings.layers} layers, heads of
{settings.head_dim}; {settings.steps} steps per run, seeds {settings.seeds} (averaged), LRs lr x 2^(k/2) around
{centres} ({settings.lr_points} points); trainer overrides {settings.trainer}. Transfer holds when the best LR's grid
index spreads over at most one sqrt(2)-step across widths; wider is better when, at the widest width's best LR and its
neighbours, no wider model's final loss exceeds the next narrower one's by more than {settings.loss_tolerance:g}.
"""
    for optimizer, result in results.items():
        grid = grids[optimizer]
        figure = plot(optimizer, by_optimizer[optimizer], grid, result, out_dir)
        rows = [
            [width, *points, result["best_lr"][width], "edge" if width in result["at_grid_edge"] else ""]
            for width, points in by_optimizer[optimizer].items()
        ]
        table = markdown_table(["width", *(f"lr {lr:.3g}" for lr in grid), "best LR", "best on grid edge"], rows)
        text += f"\n## {optimizer} ({settings.parametrization.for_optimizer(optimizer)})\n\n"
        text += f"![loss against LR]({figure})\n\nFinal validation loss (-: diverged):\n\n{table}\n\n"
        text += "\n\n".join(lines[optimizer]) + "\n"
        near = [grid.index(lr) for lr in result["near_lrs"]]
        result["paired_rises"] = paired_rises(runs, optimizer, settings.widths, near)
        if result["paired_rises"]:
            rows = [
                [f"{grid[r['lr_index']]:.3g}", f"w{r['narrower']} -> w{r['wider']}", f"{r['rise']:+.3f}",
                 f"{r['ci95'][0]:+.3f}..{r['ci95'][1]:+.3f}", r["seeds"]]
                for r in result["paired_rises"]
            ]  # fmt: skip
            text += (
                "\nLoss of each width minus the next narrower one's near the optimum, paired by seed (negative: wider "
                "is better):\n\n"
                + markdown_table(["LR", "widths", "mean rise", "95% CI over seeds", "seeds"], rows)
                + "\n"
            )
        result["lr_preference"] = preference = lr_preference(runs, optimizer, settings.widths, settings.lr_points)
        if preference["per_width"]:
            text += "\n" + preference_text(preference)
    data = dict(
        settings=dataclasses.asdict(settings),
        lr_grids=grids,
        final_loss={o: {str(w): points for w, points in by_optimizer[o].items()} for o in settings.optimizers},
        results={o: _json_keys(r) for o, r in results.items()},
    )
    path = write_report(out_dir, f"LR transfer ({settings.parametrization})", text, data)
    for optimizer in settings.optimizers:
        print(lines[optimizer][1])
    for optimizer in settings.optimizers:
        print(lines[optimizer][0])
    failed = [lines[o][0] for o, r in results.items() if not r["transfers"]]
    failed += [lines[o][1] for o, r in results.items() if not r["wider_is_better"]]
    if failed:
        raise ExperimentFailed(f"{'; '.join(failed)} (see {path})")
    return path


def _json_keys(result: dict) -> dict:
    """``result`` with its width-keyed dicts keyed by strings, as JSON has them."""
    return {
        k: {str(w): v for w, v in value.items()} if isinstance(value, dict) else value for k, value in result.items()
    }


TRANSFER = Experiment("transfer", TransferSettings, plan, report, __doc__)
run, main = TRANSFER.run, TRANSFER.main


if __name__ == "__main__":
    sys.exit(main())
