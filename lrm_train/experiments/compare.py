"""LRM vs muP in one command: the paper's comparison of arms x optimizers x LR grid x seeds, with a report.

    python -m lrm_train.experiments.compare                          # experiment=compare_cpu: minutes on 2 CPU cores
    python -m lrm_train.experiments.compare experiment=compare_0p5b  # the paper's scale (GPUs)
    python -m lrm_train.experiments.compare report=only              # rebuild the report from the finished runs
    python -m lrm_train.experiments.compare launcher=slurm slurm.sbatch_args=[--partition=gpu]
    python -m lrm_train.experiments.compare 'arms.lrm_one=["lrm=full","lrm.init=one"]' --estimate

``arms.NAME=[overrides]`` adds the arm NAME, or replaces it if the experiment has one (quote it for the shell).

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

from lrm_train.experiments.compare_plots import (
    plot_gap,
    plot_lr_sensitivity,
    plot_multipliers,
    plot_norms,
    plot_val_curves,
)
from lrm_train.experiments.experiment import Experiment, ExperimentSettings
from lrm_train.experiments.report import markdown_table, write_report
from lrm_train.experiments.results import (
    RunResult,
    at_or_before,
    best_lrs,
    collect,
    finite,
    gap_curve,
    lr_table,
    mean_std,
    tokens_at_step,
)
from lrm_train.experiments.runner import (
    DIVERGED,
    FINISHED,
    RunSpec,
    make_run,
)
from lrm_train.optim import decay_start
from lrm_train.train.checkpoint import complete_checkpoints
from lrm_train.utils import atomic_write_text


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
class CompareConfig(ExperimentSettings):
    """Settings of a comparison (``configs/experiment/compare_*.yaml`` fill them in; see ``configs/compare.yaml``)."""

    out_dir: str = "runs/${name}"  # gitignored, beside the trainer's own runs
    name: str = "compare"
    # arm -> its trainer overrides (lrm=...); on the command line arms.NAME=[...] adds or replaces one (arm_overrides)
    arms: dict[str, list[str]] = field(default_factory=dict)
    baseline: str = "mup"  # the arm the others are compared with
    optimizers: list[str] = field(default_factory=lambda: ["adamw", "muon"])
    lr_center: dict[str, float] = field(default_factory=dict)  # optimizer -> the LR in the middle of its grid
    lr_points: int = 3  # LRs per grid, sqrt(2) apart, centred on lr_center
    seeds: list[int] = field(default_factory=lambda: [0])
    train: list[str] = field(default_factory=list)  # trainer overrides every run shares: model, data, budget, schedule
    train_extra: list[str] = field(default_factory=list)  # more of them, from the command line (e.g. data.source)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
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
        decay_step = decay_start(first.cfg.schedule, first.cfg.train.max_steps)
        decay_tokens = tokens_at_step(base_runs[curve["seeds"][0]].records, decay_step)
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


COMPARE = Experiment("compare", CompareConfig, plan, build_report, __doc__, overrides=arm_overrides)
main = COMPARE.main


if __name__ == "__main__":
    sys.exit(main())
