"""LRM vs muP in one command: the paper's comparison of arms x optimizers x LR grid x seeds, with a report.

    python -m lrm_train.experiments.compare                          # experiment=compare_cpu: minutes on 2 CPU cores
    python -m lrm_train.experiments.compare experiment=compare_0p5b  # the paper's scale (GPUs)
    python -m lrm_train.experiments.compare report=only              # rebuild the report from the finished runs
    python -m lrm_train.experiments.compare launcher=slurm slurm.sbatch_args=[--partition=gpu]

Every run goes through the trainer, in its own run directory ``<out_dir>/runs/<arm>-<optimizer>-lr<lr>-s<seed>``.
Arms differ only in their ``lrm`` overrides: every run of a comparison has the same model, data order (per seed),
token budget and schedule, and the command refuses a config where an arm changes them. A rerun skips finished runs
and resumes unfinished ones (see ``runner.py``); ``report=only`` rebuilds the report from whatever has finished.

The report (``<out_dir>/report.md``, ``report.json``, PNGs) takes each arm's best LR (lowest final validation loss,
averaged over seeds) and shows: validation loss against tokens, the gap to the baseline against tokens (paired by
seed: the same seed is the same data order), final loss against LR, a table with mean +- std over seeds and whether
the gap exceeds the seed spread, multiplier trajectories, and matrix norms against the ABM prediction.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lrm_train.cli import run_command
from lrm_train.config_compose import compose_schema
from lrm_train.experiments.report import (
    finite,
    markdown_table,
    mean_std,
    new_figure,
    read_metrics,
    save_figure,
    series,
    write_report,
)
from lrm_train.experiments.runner import (
    AGAIN,
    DIVERGED,
    FINISHED,
    RunSpec,
    SlurmConfig,
    create_out_dir,
    make_run,
    python_command,
    run_local,
    run_status,
    submit_slurm,
)
from lrm_train.models import FalconH1LM
from lrm_train.optim import batch_fraction
from lrm_train.train.checkpoint import complete_checkpoints
from lrm_train.utils import atomic_write_text

LAUNCHERS = ("local", "slurm")
REPORT_MODES = ("after", "only")


@dataclass
class DownstreamConfig:
    """Scoring each arm's best-LR final checkpoints with ``lrm_train.eval`` (lm-evaluation-harness tasks)."""

    tasks: list[str] = field(default_factory=list)  # e.g. [hellaswag, arc_easy]; empty: no downstream columns
    limit: float | None = None  # items per task (a float below 1: a fraction); None: all
    batch_size: int = 8

    def __post_init__(self) -> None:
        # Checked here, not when the scores are asked for: that is after every run has trained.
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"downstream.limit={self.limit} must be > 0 (below 1: a fraction of each task)")
        if self.batch_size < 1:
            raise ValueError(f"downstream.batch_size={self.batch_size} must be >= 1")


@dataclass
class CompareConfig:
    """Settings of a comparison (``configs/experiment/compare_*.yaml`` fill them in; see ``configs/compare.yaml``)."""

    name: str = "compare"
    out_dir: str = "runs/${name}"  # gitignored, beside the trainer's own runs
    # arm -> its trainer overrides (lrm=...); on the command line arms.NAME=[...] adds or replaces one (arm_overrides)
    arms: dict[str, list[str]] = field(default_factory=dict)
    baseline: str = "mup"  # the arm the others are compared with
    optimizers: list[str] = field(default_factory=lambda: ["adamw", "muon"])
    lr_center: dict[str, float] = field(default_factory=dict)  # optimizer -> the LR in the middle of its grid
    lr_points: int = 3  # LRs per grid, sqrt(2) apart, centred on lr_center
    seeds: list[int] = field(default_factory=lambda: [0])
    train: list[str] = field(default_factory=list)  # trainer overrides every run shares: model, data, budget, schedule
    train_extra: list[str] = field(default_factory=list)  # more of them, from the command line (e.g. data.source)
    launcher: str = "local"  # local: one run after another here; slurm: one sbatch job per run
    nproc: int = 0  # local: processes per run (0: one per visible GPU; torchrun + DDP when more than one)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    report: str = "after"  # after: train, then report; only: rebuild the report from the finished runs
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)

    def __post_init__(self) -> None:
        if self.baseline not in self.arms:
            raise ValueError(f"baseline={self.baseline!r} is not one of the arms ({', '.join(self.arms) or 'none'})")
        missing = [o for o in self.optimizers if o not in self.lr_center]
        if missing:
            raise ValueError(f"lr_center has no LR for optimizer {missing[0]!r}")
        for optimizer, lr in self.lr_center.items():
            if lr <= 0:
                raise ValueError(f"lr_center.{optimizer}={lr} must be > 0")
        if self.lr_points < 1:
            raise ValueError(f"lr_points={self.lr_points} must be >= 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={list(self.seeds)} must be distinct and at least one")
        if self.nproc < 0:
            raise ValueError(f"nproc={self.nproc} must be >= 0 (0: one process per visible GPU)")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher={self.launcher!r} is not one of {', '.join(LAUNCHERS)}")
        if self.report not in REPORT_MODES:
            raise ValueError(f"report={self.report!r} is not one of {', '.join(REPORT_MODES)}")


def arm_overrides(overrides: list[str]) -> list[str]:
    """Command-line overrides with ``arms.NAME=[...]`` as Hydra's ``++arms.NAME=[...]``: it adds the arm NAME, or
    replaces it when the experiment has one. Hydra refuses a new key without ``+`` and an existing one with it, and
    arms are an open set; every other key keeps Hydra's checks, so a typo in it is still refused."""
    return [f"++{o}" if o.startswith("arms.") else o for o in overrides]


def lr_grid(center: float, points: int) -> list[float]:
    """``points`` LRs on sqrt(2) steps around ``center`` (an even count puts the extra point above it)."""
    low = -((points - 1) // 2)
    return [center * math.sqrt(2) ** k for k in range(low, low + points)]


def plan(cfg: CompareConfig) -> list[RunSpec]:
    """Every run of the comparison, composed (a bad override fails here, before any training).

    In the order that gives a comparison soonest when the runs go one after another: the grid's centre LR first,
    and each arm beside the others at the same optimizer, LR and seed."""
    runs = []
    for k in sorted(range(cfg.lr_points), key=lambda k: abs(k - (cfg.lr_points - 1) // 2)):
        for optimizer in cfg.optimizers:
            lr = lr_grid(cfg.lr_center[optimizer], cfg.lr_points)[k]
            for seed in cfg.seeds:
                for arm, arm_overrides in cfg.arms.items():
                    name = f"{arm}-{optimizer}-lr{lr:.3g}-s{seed}"
                    overrides = [
                        *cfg.train,
                        *cfg.train_extra,
                        *arm_overrides,
                        f"optim={optimizer}",
                        f"optim.lr={lr!r}",
                        f"train.seed={seed}",
                        f"logging.wandb.group={cfg.name}",
                    ]
                    run_dir = Path(cfg.out_dir) / "runs" / name
                    runs.append(make_run(name, run_dir, overrides, arm=arm, optimizer=optimizer, lr=lr, seed=seed))
    check_same_budget(runs)
    return runs


def check_same_budget(runs: list[RunSpec]) -> None:
    """Every run must see the same model, data, token budget and schedule; only its seed and run dir differ."""

    def shared(run: RunSpec) -> dict:
        train = dataclasses.replace(run.cfg.train, seed=0, run_dir="")
        return dict(model=run.cfg.model, data=run.cfg.data, schedule=run.cfg.schedule, train=train)

    first = shared(runs[0])
    for run in runs[1:]:
        for key, value in shared(run).items():
            if value != first[key]:
                raise ValueError(
                    f"run {run.name} has another {key} config than {runs[0].name}: every arm must see the same "
                    "model, data, token budget and schedule (put those overrides in `train`, not in an arm)"
                )
    t = runs[0].cfg.train
    if t.eval_every % t.log_every:
        raise ValueError(
            f"train.eval_every={t.eval_every} must be a multiple of train.log_every={t.log_every}, so that every "
            "validation loss is logged with its tokens_seen"
        )


# The report.


@dataclass
class RunResult:
    run: RunSpec
    status: str
    final: float | None  # validation loss at the final step; None if the run diverged
    tokens: list[int]  # at each validation
    val: list[float | None]
    records: list[dict]

    @property
    def label(self) -> tuple[str, str]:
        return self.run.labels["arm"], self.run.labels["optimizer"]


def collect(runs: list[RunSpec]) -> list[RunResult]:
    results = []
    for run in runs:
        status = run_status(run)
        if status not in (FINISHED, DIVERGED):
            continue
        records = read_metrics(run.run_dir)
        with_val = [r for r in records if "val_loss" in r]
        final = with_val[-1]["val_loss"] if status == FINISHED and with_val else None
        tokens = [r["tokens_seen"] for r in with_val]
        results.append(RunResult(run, status, final, tokens, [r["val_loss"] for r in with_val], records))
    return results


def lr_table(results: list[RunResult]) -> dict:
    """(arm, optimizer) -> lr -> {seed: result}."""
    table: dict = {}
    for r in results:
        table.setdefault(r.label, {}).setdefault(r.run.labels["lr"], {})[r.run.labels["seed"]] = r
    return table


def best_lrs(table: dict) -> dict:
    """(arm, optimizer) -> the LR with the lowest mean final loss over its finished seeds (diverged LRs excluded)."""
    best = {}
    for label, by_lr in table.items():
        means = {
            lr: mean_std([r.final for r in seeds.values()])[0]
            for lr, seeds in by_lr.items()
            if all(finite(r.final) for r in seeds.values())
        }
        if means:
            best[label] = min(means, key=means.get)
    return best


def decay_start_step(run: RunSpec) -> int:
    """Where a constant-then-decay schedule starts its decay (the end of the run for the others)."""
    s, t = run.cfg.schedule, run.cfg.train
    decays = s.name in ("constant_exp_decay", "wsd")
    return t.max_steps - round(s.decay_fraction * t.max_steps) if decays else t.max_steps


def gap_curve(arm_runs: dict, base_runs: dict) -> dict | None:
    """The loss gap arm - baseline at each common validation step, paired by seed: mean and std over seeds."""
    seeds = sorted(set(arm_runs) & set(base_runs))
    if not seeds:
        return None
    per_seed = []
    for seed in seeds:
        a, b = arm_runs[seed], base_runs[seed]
        base_by_tokens = dict(zip(b.tokens, b.val))
        per_seed.append(
            {t: v - base_by_tokens[t] for t, v in zip(a.tokens, a.val) if finite(v) and t in base_by_tokens}
        )
    tokens = sorted(set.intersection(*(set(p) for p in per_seed)))
    stats = [mean_std([p[t] for p in per_seed]) for t in tokens]
    return dict(seeds=seeds, tokens=tokens, mean=[m for m, _ in stats], std=[s for _, s in stats])


def tokens_at_step(records: list[dict], step: int) -> float | None:
    """Tokens seen after ``step`` steps, interpolated between the logged records around it (exact without a batch
    ramp); None past the last record."""
    logged = [(r["step"], r["tokens_seen"]) for r in records if "tokens_seen" in r]
    before = [(s, t) for s, t in logged if s <= step] or [(0, 0)]
    after = [(s, t) for s, t in logged if s >= step]
    if not after:
        return None
    (s0, t0), (s1, t1) = before[-1], after[0]
    return t0 if s1 == s0 else t0 + (t1 - t0) * (step - s0) / (s1 - s0)


def at_or_before(curve: dict, tokens: float) -> float | None:
    earlier = [m for t, m in zip(curve["tokens"], curve["mean"]) if t <= tokens]
    return earlier[-1] if earlier else None


def summarize(cfg: CompareConfig, results: list[RunResult]) -> dict:
    """Every number the report shows."""
    table = lr_table(results)
    best = best_lrs(table)
    rows = []
    for (arm, optimizer), by_lr in sorted(table.items(), key=lambda kv: (kv[0][1], list(cfg.arms).index(kv[0][0]))):
        lr_curve = []
        for lr in sorted(by_lr):
            finals = [r.final for r in by_lr[lr].values()]
            diverged = not all(finite(f) for f in finals)
            mean, std = (None, None) if diverged else mean_std(finals)
            lr_curve.append(dict(lr=lr, mean=mean, std=std, seeds=sorted(by_lr[lr]), diverged=diverged))
        row = dict(arm=arm, optimizer=optimizer, lr_curve=lr_curve, best_lr=best.get((arm, optimizer)))
        finite_means = [p["mean"] for p in lr_curve if p["mean"] is not None]
        row["lr_range"] = max(finite_means) - min(finite_means) if len(finite_means) > 1 else None
        grid = lr_grid(cfg.lr_center[optimizer], cfg.lr_points)
        row["best_at_grid_edge"] = cfg.lr_points > 1 and row["best_lr"] in (grid[0], grid[-1])
        row["grid_finished"] = len(lr_curve) == len(grid)
        if row["best_lr"] is not None:
            seeds = by_lr[row["best_lr"]]
            row["seeds"] = sorted(seeds)
            row["finals"] = [seeds[s].final for s in sorted(seeds)]
            row["final_mean"], row["final_std"] = mean_std(row["finals"])
            row["run_dirs"] = [str(seeds[s].run.run_dir) for s in sorted(seeds)]
        rows.append(row)
    by_label = {(r["arm"], r["optimizer"]): r for r in rows}
    for row in rows:
        base = by_label.get((cfg.baseline, row["optimizer"]))
        if row["arm"] == cfg.baseline or row["best_lr"] is None or base is None or base["best_lr"] is None:
            continue
        arm_runs = table[(row["arm"], row["optimizer"])][row["best_lr"]]
        base_runs = table[(cfg.baseline, row["optimizer"])][base["best_lr"]]
        curve = gap_curve(arm_runs, base_runs)
        if curve is None:
            continue
        final_gaps = [arm_runs[s].final - base_runs[s].final for s in curve["seeds"]]
        gap, gap_std = mean_std(final_gaps)
        spreads = [s for s in (row["final_std"], base["final_std"]) if s is not None]
        spread = max(spreads) if len(spreads) == 2 else None
        first = next(iter(arm_runs.values())).run
        decay_tokens = tokens_at_step(base_runs[curve["seeds"][0]].records, decay_start_step(first))
        row["gap"] = dict(
            final=gap,
            final_std=gap_std,
            per_seed=final_gaps,
            seed_spread=spread,
            exceeds_spread=None if spread is None else abs(gap) > spread,
            at_decay_start=None if decay_tokens is None else at_or_before(curve, decay_tokens),
            decay_start_tokens=decay_tokens,
            curve=curve,
        )
    return dict(
        experiment=cfg.name,
        baseline=cfg.baseline,
        runs=[
            dict(name=r.run.name, status=r.status, final_val_loss=r.final, run_dir=str(r.run.run_dir), **r.run.labels)
            for r in results
        ],
        rows=rows,
    )


DOWNSTREAM_FILE = "downstream.json"  # in a run directory: its final checkpoint's scores, and how they were taken


def downstream_scores(run: RunSpec, settings: DownstreamConfig) -> dict[str, float]:
    """``{task/metric: value}`` of the run's final checkpoint, scored once per task list and limit (then cached)."""
    from lrm_train.eval import api  # lm-evaluation-harness loads only when scores are asked for

    wanted = dict(tasks=list(settings.tasks), limit=settings.limit)
    cache = run.run_dir / DOWNSTREAM_FILE
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored["settings"] == wanted:
            return stored["scores"]
    checkpoint = complete_checkpoints(run.run_dir)[-1]
    print(f"scoring {checkpoint} on {', '.join(settings.tasks)}", flush=True)
    result = api.evaluate_checkpoint(checkpoint, settings.tasks, settings.limit, settings.batch_size)
    scores = {
        f"{task}/{metric}": value for task, metrics in result["tasks"].items() for metric, value in metrics.items()
    }
    atomic_write_text(cache, json.dumps(dict(settings=wanted, scores=scores), indent=1))
    return scores


def add_downstream(cfg: CompareConfig, table: dict, summary: dict) -> list[str]:
    """Each row's downstream scores at its best LR (mean over seeds); returns the score names, in column order."""
    names: set[str] = set()
    for row in summary["rows"]:
        if row["best_lr"] is None:
            continue
        per_seed = [
            downstream_scores(r.run, cfg.downstream)
            for r in table[(row["arm"], row["optimizer"])][row["best_lr"]].values()
        ]
        row["downstream"] = {k: mean_std([s[k] for s in per_seed])[0] for k in per_seed[0]}
        names |= set(row["downstream"])
    return sorted(names)


def _edge_words(rows: list[dict], lr_points: int) -> str:
    if lr_points == 1:  # no grid to lie inside
        return "**One LR per arm** (`lr_points=1`): whether it is the best LR is not known; the gap is at that LR."
    edge = [f"{r['arm']} ({r['optimizer']})" for r in rows if r["best_at_grid_edge"]]
    unfinished = [f"{r['arm']} ({r['optimizer']})" for r in rows if not r["grid_finished"]]
    words = []
    if edge:
        words.append(
            f"**Best LR at the edge of the grid** for {', '.join(edge)}: the optimum may lie outside it, so the gap "
            "may be overstated; widen the grid (`lr_points`, `lr_center`) before trusting it."
        )
    if unfinished:
        words.append(
            f"Not every LR of the grid has finished for {', '.join(unfinished)}: their best LR is provisional."
        )
    return " ".join(words) or "Every best LR lies inside its grid."


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f} (1 seed)"


def _gap_words(row: dict, baseline: str) -> str:
    g = row["gap"]
    sign = "lower" if g["final"] < 0 else "higher"
    if g["exceeds_spread"] is None:
        verdict = "the seed spread is unknown with one seed, so whether the gap is real cannot be told"
    elif g["exceeds_spread"]:
        verdict = f"larger than the seed spread ({g['seed_spread']:.4f})"
    else:
        verdict = f"within the seed spread ({g['seed_spread']:.4f}): not distinguishable from noise"
    decay = (
        ""
        if g["at_decay_start"] is None
        else f"; at the last evaluation before the LR decay it was {g['at_decay_start']:+.4f}"
    )
    return (
        f"- **{row['arm']} vs {baseline}, {row['optimizer']}**: final gap {g['final']:+.4f} ({row['arm']} "
        f"{sign}){decay}; {verdict}."
    )


def legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:  # a panel may have nothing to label (no gap without a baseline)
        ax.legend()


def plot_val_curves(out: Path, cfg: CompareConfig, table: dict, summary: dict) -> str:
    fig, axes = new_figure(len(cfg.optimizers), "validation loss at each arm's best LR (mean over seeds, ± std)")
    for ax, optimizer in zip(axes, cfg.optimizers):
        for row in summary["rows"]:
            if row["optimizer"] != optimizer or row["best_lr"] is None:
                continue
            seeds = table[(row["arm"], optimizer)][row["best_lr"]]
            common = sorted(set.intersection(*(set(r.tokens) for r in seeds.values())))
            stats = [mean_std([dict(zip(r.tokens, r.val))[t] for r in seeds.values()]) for t in common]
            mean = [m for m, _ in stats]
            ax.plot(common, mean, label=f"{row['arm']} (lr {row['best_lr']:.3g})")
            if len(seeds) > 1:
                std = [s for _, s in stats]
                ax.fill_between(
                    common, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.25
                )
        ax.set(title=optimizer, xlabel="tokens", ylabel="validation loss")
        legend(ax)
    return save_figure(fig, out / "val_loss.png")


def plot_gap(out: Path, cfg: CompareConfig, summary: dict) -> str:
    fig, axes = new_figure(len(cfg.optimizers), f"loss gap: arm minus {cfg.baseline} (below 0: the arm is better)")
    for ax, optimizer in zip(axes, cfg.optimizers):
        ax.axhline(0, color="black", lw=0.8)
        for row in summary["rows"]:
            if row["optimizer"] != optimizer or "gap" not in row:
                continue
            c = row["gap"]["curve"]
            (line,) = ax.plot(c["tokens"], c["mean"], label=f"{row['arm']} - {cfg.baseline}")
            if len(c["seeds"]) > 1:
                ax.fill_between(
                    c["tokens"],
                    [m - s for m, s in zip(c["mean"], c["std"])],
                    [m + s for m, s in zip(c["mean"], c["std"])],
                    color=line.get_color(),
                    alpha=0.25,
                )
            if row["gap"]["decay_start_tokens"] is not None:
                ax.axvline(row["gap"]["decay_start_tokens"], color="grey", ls=":", lw=1)
        ax.set(title=f"{optimizer} (dotted: LR decay starts)", xlabel="tokens", ylabel="validation loss gap")
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


def _best_run(table: dict, row: dict) -> RunResult:
    seeds = table[(row["arm"], row["optimizer"])][row["best_lr"]]
    return seeds[min(seeds)]


MOVERS_SHOWN = 5


def plot_multipliers(out: Path, table: dict, summary: dict) -> str | None:
    """Scalar multipliers and the mean of row/column multipliers against step, for each LRM arm at its best LR."""
    rows = [r for r in summary["rows"] if r["best_lr"] is not None and r["arm"] != summary["baseline"]]
    panels = []
    for row in rows:
        records = _best_run(table, row).records
        keys = sorted(
            {k for rec in records for k in rec if k.startswith("lrm/") and (k.endswith((".lrm_scalar", "/mean")))}
        )
        if keys:
            panels.append((row, records, keys))
    if not panels:
        return None
    fig, axes = new_figure(
        len(panels),
        "multipliers at the best LR, relative to their first logged value (scalars; means of row/column vectors)",
    )
    for ax, (row, records, keys) in zip(axes, panels):
        ratios = {}
        for key in keys:
            steps, values = series(records, key)
            ratios[key] = (steps, [v / values[0] if finite(v) and values[0] else None for v in values])
        # The multipliers that moved most (by final |log ratio|) are named in the legend and in report.json.
        moved = {k: abs(math.log(r[-1])) for k, (_, r) in ratios.items() if finite(r[-1]) and r[-1] > 0}
        movers = sorted(moved, key=moved.get, reverse=True)[:MOVERS_SHOWN]
        row["multipliers_moved_most"] = {k.removeprefix("lrm/"): ratios[k][1][-1] for k in movers}
        for key, (steps, ratio) in ratios.items():
            label = key.removeprefix("lrm/") if key in movers else None
            ax.plot(steps, ratio, lw=1.4 if label else 0.6, alpha=1.0 if label else 0.5, label=label)
        ax.set_yscale("log")
        title = f"{row['arm']}, {row['optimizer']}, lr {row['best_lr']:.3g}"
        ax.set(title=title, xlabel="step", ylabel="value / first logged value")
        ax.legend(fontsize=7, title="moved most")
    return save_figure(fig, out / "multipliers.png")


def plot_norms(out: Path, table: dict, summary: dict) -> str | None:
    """Matrix norms (RMS of W) against the ABM prediction of noise and weight decay alone, per arm at its best LR."""
    rows = [r for r in summary["rows"] if r["best_lr"] is not None]
    if not rows:
        return None
    fig, axes = new_figure(len(rows), "matrix norms ||W|| (solid) against the ABM prediction (dashed)")
    for ax, row in zip(axes, rows):
        records = _best_run(table, row).records
        keys = sorted({k for rec in records for k in rec if k.startswith(("norm/", "abm/"))})
        for key in keys:
            steps, values = series(records, key)
            abm = key.startswith("abm/")
            ax.plot(
                steps,
                values,
                lw=1.8 if abm else 0.6,
                ls="--" if abm else "-",
                color="black" if abm else None,
                alpha=1.0 if abm else 0.6,
            )
        ax.set_yscale("log")
        ax.set(title=f"{row['arm']}, {row['optimizer']}, lr {row['best_lr']:.3g}", xlabel="step", ylabel="RMS")
    return save_figure(fig, out / "norms_abm.png")


def build_report(cfg: CompareConfig, runs: list[RunSpec]) -> Path:
    results = collect(runs)
    if not any(r.status == FINISHED for r in results):
        raise RuntimeError(f"no finished run under {cfg.out_dir}/runs yet: nothing to report")
    out = Path(cfg.out_dir)
    table = lr_table(results)
    summary = summarize(cfg, results)
    first = runs[0].cfg
    figures = dict(
        val_loss=plot_val_curves(out, cfg, table, summary),
        gap=plot_gap(out, cfg, summary),
        lr_sensitivity=plot_lr_sensitivity(out, cfg, summary),
        multipliers=plot_multipliers(out, table, summary),
        norms_abm=plot_norms(out, table, summary),
    )
    summary["figures"] = figures
    summary["settings"] = dict(
        arms=cfg.arms,
        optimizers=cfg.optimizers,
        lr_grids={o: lr_grid(cfg.lr_center[o], cfg.lr_points) for o in cfg.optimizers},
        seeds=cfg.seeds,
        train=cfg.train,
        max_steps=first.train.max_steps,
    )
    scores = add_downstream(cfg, table, summary) if cfg.downstream.tasks else []
    header = [
        "arm",
        "optimizer",
        "best LR",
        "final val loss (mean ± std)",
        "seeds",
        f"gap vs {cfg.baseline} (mean ± std)",
        "gap > seed spread?",
        "loss range over the LR grid",
        *scores,
    ]
    lines = []
    for row in summary["rows"]:
        g = row.get("gap")
        exceeds = (
            "-"
            if g is None
            else ("unknown (1 seed)" if g["exceeds_spread"] is None else ("yes" if g["exceeds_spread"] else "no"))
        )
        lines.append(
            [
                row["arm"],
                row["optimizer"],
                row["best_lr"],
                _pm(row.get("final_mean"), row.get("final_std")),
                len(row.get("seeds", [])),
                "-" if g is None else _pm(g["final"], g["final_std"]),
                exceeds,
                row["lr_range"],
                *(row.get("downstream", {}).get(name) for name in scores),
            ]
        )
    finished = sum(r.status == FINISHED for r in results)
    diverged = [r.run.name for r in results if r.status == DIVERGED]
    md = [
        f"{finished} of {len(runs)} runs finished" + (f"; diverged: {', '.join(diverged)}" if diverged else "") + ".",
        f"Each run: {first.train.max_steps} steps of {first.train.micro_batch_size * first.train.grad_accum} x "
        f"{first.data.seq_len} tokens per process, a model {first.model.hidden_size} wide with "
        f"{first.model.num_hidden_layers} layers, schedule `{first.schedule.name}`; the shared trainer overrides "
        f"are `{' '.join(cfg.train)}`. LR grids (sqrt(2) apart): "
        + "; ".join(
            f"{o}: {', '.join(f'{lr:.3g}' for lr in lrs)}" for o, lrs in summary["settings"]["lr_grids"].items()
        )
        + ".",
        "## Best-LR final validation loss",
        markdown_table(header, lines),
        (
            "The gap is the arm's final validation loss minus the baseline's at their own best LRs, paired by seed "
            "(below 0: the arm is better). It exceeds the seed spread when |gap| is larger than the larger of the two "
            "arms' standard deviations over seeds. The LR range is the worst minus the best mean final loss over the "
            "grid: the smaller, the cheaper the LR is to tune. The baseline keeps the model config's fixed muP "
            "multipliers; the paper compares against *tuned* ones, so with untuned multipliers (the tiny preset "
            "carries the 0.5B model's) part of a gap in LRM's favour is what tuning them would have bought."
        ),
        "\n".join(_gap_words(row, cfg.baseline) for row in summary["rows"] if "gap" in row),
        _edge_words(summary["rows"], cfg.lr_points),
        "## Figures",
        (
            f"![validation loss]({figures['val_loss']})\n\nValidation loss against tokens for each arm at its best LR "
            "(a band: ± std over seeds, when there are several)."
        ),
        (
            f"![gap]({figures['gap']})\n\nThe gap against tokens; the paper's gap in favour of LRM grows through the "
            "constant-LR phase and shrinks slightly in the decay (dotted line)."
        ),
        (
            f"![LR sensitivity]({figures['lr_sensitivity']})\n\nFinal loss against LR: a flatter curve means a cheaper "
            "LR search."
        ),
    ]
    if figures["multipliers"]:
        md.append(
            f"![multipliers]({figures['multipliers']})\n\nLearned multipliers of the LRM arms against step "
            "(scalars, and row/column means), each divided by its first logged value: how far each has moved from "
            "where it started. Moved most (final / first):\n\n"
            + "\n".join(
                f"- {row['arm']}, {row['optimizer']}: "
                + ", ".join(f"`{k}` x{v:.3g}" for k, v in row["multipliers_moved_most"].items())
                for row in summary["rows"]
                if "multipliers_moved_most" in row
            )
        )
    if figures["norms_abm"]:
        md.append(
            f"![norms]({figures['norms_abm']})\n\nMatrix norms against the Adam-Brownian-motion prediction: "
            "the paper finds that matrices follow it (their scale is set by noise and weight decay)."
        )
    if scores:
        md.append(
            f"Downstream scores (`{'`, `'.join(scores)}`) are each arm's best-LR final checkpoints scored by "
            f"`lrm_train.eval` (mean over seeds; limit {cfg.downstream.limit or 'none'} items per task)."
        )
    md.append("Every number above is in `report.json`.")
    path = write_report(out, f"{cfg.name}: LRM vs muP", "\n\n".join(md), summary)
    return path


def tokens_per_run(run: RunSpec, world_size: int) -> int:
    """Training tokens of one run, batch ramp included (the trainer's ``batch_fraction``, in whole micro-batches)."""
    t = run.cfg.train
    micro_batches = sum(
        max(1, math.ceil(t.grad_accum * batch_fraction(run.cfg.schedule, step))) for step in range(t.max_steps)
    )
    return micro_batches * t.micro_batch_size * world_size * run.cfg.data.seq_len


def estimate(cfg: CompareConfig, runs: list[RunSpec], mfu: float) -> str:
    """GPU hours of the comparison from the model's training FLOPs per token at an assumed MFU."""
    world = cfg.nproc or 1
    run = runs[0]
    with torch.device("meta"):  # the FLOPs need the shapes only
        model = FalconH1LM(run.cfg.model, run.cfg.lrm)
    flops_per_token = model.flops_per_token(run.cfg.data.seq_len)
    tokens = tokens_per_run(run, world)
    peak = run.cfg.logging.peak_tflops * 1e12
    hours = flops_per_token * tokens / (mfu * peak) / 3600
    return (
        f"{len(runs)} runs x {tokens / 1e9:.3g} GT at {flops_per_token:.3g} training FLOPs/token "
        f"({world} processes per run): {hours:,.0f} GPU hours per run, {hours * len(runs):,.0f} in all, "
        f"assuming {mfu:.0%} MFU of {run.cfg.logging.peak_tflops:g} TFLOP/s per GPU (logging.peak_tflops)"
    )


USAGE = """usage: python -m lrm_train.experiments.compare [experiment=NAME] [key=value ...] [--estimate]

keys (configs/compare.yaml, configs/experiment/*.yaml): name, out_dir, arms.<arm>=[overrides], baseline,
optimizers, lr_center.<optimizer>, lr_points, seeds, train=[trainer overrides], train_extra=[more of them],
launcher (local|slurm), nproc, slurm.script, slurm.nodes, slurm.sbatch_args, report (after|only),
downstream.tasks, downstream.limit, downstream.batch_size
arms.<arm>=[overrides] adds that arm, or replaces it if the experiment has one; quote it for the shell:
  python -m lrm_train.experiments.compare 'arms.lrm_one=["lrm=full","lrm.init=one"]' --estimate
--estimate prints the GPU hours the comparison would take at an assumed 35% MFU, and exits
"""
ASSUMED_MFU = 0.35  # typical of well-tuned bf16 training on H100s (e.g. torchtitan's 33-39%); not measured here


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def work(planned: tuple[CompareConfig, list[RunSpec]], flags: list[str]) -> None:
        cfg, runs = planned
        if flags:  # --estimate
            print(estimate(cfg, runs, ASSUMED_MFU))
            return
        if cfg.report == "after":
            create_out_dir(cfg.out_dir)
            if cfg.launcher == "slurm":
                report = python_command("lrm_train.experiments.compare", [*argv, "report=only", "launcher=local"])
                submit_slurm(runs, cfg.slurm, report)
                return
            run_local(runs, cfg.nproc)
        print(f"report: {build_report(cfg, runs)}")

    return run_command(
        argv, USAGE + "\n" + (__doc__ or ""), _compose_and_plan, work, flags=("--estimate",), again=AGAIN
    )


def _compose_and_plan(overrides: list[str]) -> tuple[CompareConfig, list[RunSpec]]:
    cfg = compose_schema("compare", CompareConfig, arm_overrides(overrides))
    return cfg, plan(cfg)  # a run's config error is a config error too: before any work


if __name__ == "__main__":
    sys.exit(main())
