"""The comparison's figures: validation curves, the paired gap, LR sensitivity, multiplier trajectories and matrix
norms against the ABM prediction. Each takes the summary ``compare.summarize`` made and, where it draws runs, the
runs shown per arm (``compare.shown_runs``: (arm, optimizer) -> seed -> result)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from lrm_train.experiments.report import new_figure, save_figure
from lrm_train.experiments.results import RunResult, finite, mean_std, series
from lrm_train.train.metrics import ABM_KEY, MULTIPLIER_KEY, NORM_KEY

if TYPE_CHECKING:
    from lrm_train.experiments.compare import CompareConfig


def legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:  # a panel may have nothing to label (no gap without a baseline)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the curves, not over them


def plot_val_curves(out: Path, cfg: CompareConfig, shown: dict, summary: dict) -> str:
    fig, axes = new_figure(len(cfg.optimizers), "validation loss at each arm's selected LR (mean over seeds, ± std)")
    for ax, optimizer in zip(axes, cfg.optimizers):
        for row in summary["rows"]:
            runs = shown.get((row["arm"], optimizer), {}) if row["optimizer"] == optimizer else {}
            seeds = {s: r for s, r in runs.items() if finite(r.final)}  # a diverged run has no curve to average
            if not seeds:
                continue
            common = sorted(set.intersection(*(set(r.tokens) for r in seeds.values())))
            stats = [mean_std([dict(zip(r.tokens, r.val))[t] for r in seeds.values()]) for t in common]
            mean = [m for m, _ in stats]
            ax.plot(common, mean, label=f"{row['arm']} (lr {row['selected_lr']:.3g})")
            if len(seeds) > 1:
                std = [s for _, s in stats]
                ax.fill_between(
                    common, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.25
                )
        ax.set(title=optimizer, xlabel="tokens", ylabel="validation loss")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))  # 1e5 tokens, not run-together digits
        legend(ax)
    return save_figure(fig, out / "val_loss.png")


def plot_gap(out: Path, cfg: CompareConfig, summary: dict) -> str:
    title = "loss gap: arm minus reference (below 0: the arm is better), paired by seed\nband: 95% CI of the mean; "
    fig, axes = new_figure(len(cfg.optimizers), title + "dashed: trend through the constant LR; dotted: decay starts")
    for ax, optimizer in zip(axes, cfg.optimizers):
        ax.axhline(0, color="black", lw=0.8)
        for gap in summary["gaps"]:
            if gap["optimizer"] != optimizer:
                continue
            c = gap["curve"]
            (line,) = ax.plot(c["tokens"], c["mean"], label=f"{gap['arm']} - {gap['reference']}")
            if len(c["seeds"]) > 1:  # the band is the mean's 95% interval over the paired seeds, not their spread
                low, high = zip(*c["ci95"])
                ax.fill_between(c["tokens"], low, high, color=line.get_color(), alpha=0.25)
            if trend := gap["trend"]:
                x = [trend["first_tokens"], trend["last_tokens"]]
                y = [trend["intercept"] + trend["slope"] * t for t in x]
                ax.plot(x, y, ls="--", color=line.get_color(), label=f"trend: {trend['trend']}")
            if gap["decay_start_tokens"] is not None:
                ax.axvline(gap["decay_start_tokens"], color="grey", ls=":", lw=1)
        ax.set(title=optimizer, xlabel="tokens", ylabel="validation loss gap")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))  # 1e5 tokens, not run-together digits
        legend(ax)
    return save_figure(fig, out / "gap.png")


def plot_lr_sensitivity(out: Path, cfg: CompareConfig, summary: dict) -> str:
    fig, axes = new_figure(len(cfg.optimizers), "final validation loss against LR (x: diverged)")
    for ax, optimizer in zip(axes, cfg.optimizers):
        for row in summary["rows"]:
            if row["optimizer"] != optimizer:
                continue
            points = [p for p in row["lr_curve"] if p["mean"] is not None]
            errors = [p["std"] or 0.0 for p in points]
            bars = ax.errorbar(
                [p["lr"] for p in points],
                [p["mean"] for p in points],
                yerr=errors,
                marker="o",
                capsize=3,
                label=row["arm"],
            )
            diverged = [p["lr"] for p in row["lr_curve"] if p["diverged"]]
            if diverged and points:
                top = max(p["mean"] for p in points)
                ax.plot(diverged, [top] * len(diverged), "x", color=bars[0].get_color(), ms=10)
        ax.set_xscale("log", base=2)
        grid = sorted({p["lr"] for row in summary["rows"] if row["optimizer"] == optimizer for p in row["lr_curve"]})
        ax.set_xticks(grid, [f"{lr:.3g}" for lr in grid])
        ax.minorticks_off()
        ax.set(title=optimizer, xlabel="base LR", ylabel="final validation loss")
        legend(ax)
    return save_figure(fig, out / "lr_sensitivity.png")


def _first_run(shown: dict, row: dict) -> RunResult:
    seeds = shown[(row["arm"], row["optimizer"])]
    return seeds[min(seeds)]


MOVERS_SHOWN = 5


def plot_multipliers(out: Path, shown: dict, summary: dict) -> str | None:
    """Scalar multipliers and the mean of row/column multipliers against step, for each LRM arm at its selected LR
    (its first seed shown)."""
    rows = [r for r in summary["rows"] if (r["arm"], r["optimizer"]) in shown and r["arm"] != summary["baseline"]]
    panels = []
    for row in rows:
        records = _first_run(shown, row).records
        keys = sorted(
            {
                k
                for rec in records
                for k in rec
                if k.startswith(MULTIPLIER_KEY) and (k.endswith((".lrm_scalar", "/mean")))
            }
        )
        if keys:
            panels.append((row, records, keys))
    if not panels:
        return None
    fig, axes = new_figure(
        len(panels),
        "multipliers at the selected LR, relative to their first logged value (scalars; means of row/column vectors)",
    )
    for ax, (row, records, keys) in zip(axes, panels):
        ratios = {}
        for key in keys:
            steps, values = series(records, key)
            ratios[key] = (steps, [v / values[0] if finite(v) and values[0] else None for v in values])
        # The multipliers that moved most (by final |log ratio|) are named in the legend and in report.json.
        moved = {k: abs(math.log(r[-1])) for k, (_, r) in ratios.items() if finite(r[-1]) and r[-1] > 0}
        movers = sorted(moved, key=moved.get, reverse=True)[:MOVERS_SHOWN]
        row["multipliers_moved_most"] = {k.removeprefix(MULTIPLIER_KEY): ratios[k][1][-1] for k in movers}
        for key, (steps, ratio) in ratios.items():
            label = key.removeprefix(MULTIPLIER_KEY) if key in movers else None
            ax.plot(steps, ratio, lw=1.4 if label else 0.6, alpha=1.0 if label else 0.5, label=label)
        ax.set_yscale("log")
        title = f"{row['arm']}, {row['optimizer']}, lr {row['selected_lr']:.3g}"
        ax.set(title=title, xlabel="step", ylabel="value / first logged value")
        ax.legend(fontsize=7, title="moved most")
    return save_figure(fig, out / "multipliers.png")


def plot_norms(out: Path, shown: dict, summary: dict) -> str | None:
    """Matrix norms (RMS of W) against the ABM prediction of noise and weight decay alone, per arm at its selected
    LR (its first seed shown)."""
    rows = [r for r in summary["rows"] if (r["arm"], r["optimizer"]) in shown]
    if not rows:
        return None
    fig, axes = new_figure(len(rows), "matrix norms ||W|| (solid) against the ABM prediction (dashed)")
    for ax, row in zip(axes, rows):
        records = _first_run(shown, row).records
        keys = sorted({k for rec in records for k in rec if k.startswith((NORM_KEY, ABM_KEY))})
        for key in keys:
            steps, values = series(records, key)
            abm = key.startswith(ABM_KEY)
            ax.plot(
                steps,
                values,
                lw=1.8 if abm else 0.6,
                ls="--" if abm else "-",
                color="black" if abm else None,
                alpha=1.0 if abm else 0.6,
            )
        ax.set_yscale("log")
        ax.set(title=f"{row['arm']}, {row['optimizer']}, lr {row['selected_lr']:.3g}", xlabel="step", ylabel="RMS")
    return save_figure(fig, out / "norms_abm.png")
