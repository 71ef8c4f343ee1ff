"""LRM vs muP in one command: an LR sweep per arm on selection seeds, then each arm at its selected LR on held-out
seeds, compared paired by seed, with a report.

    python -m lrm_train.experiments.compare                          # experiment=compare_cpu: 2 CPU cores
    python -m lrm_train.experiments.compare experiment=compare_0p5b  # the paper's scale (GPUs)
    python -m lrm_train.experiments.compare report=only              # rebuild the report from the finished runs
    python -m lrm_train.experiments.compare launcher=slurm slurm.sbatch_args=[--partition=gpu]
    python -m lrm_train.experiments.compare 'arms.lrm_one=["lrm=full","lrm.init=one"]' --estimate

``arms.NAME=[overrides]`` adds the arm NAME, or replaces it if the experiment has one (quote it for the shell).

The protocol, in two phases:
1. **Selection**: every arm x optimizer x LR of the grid on ``selection_seeds``; each arm's LR is the one with the
   lowest final loss (mean over those seeds). It must lie inside the grid: a best LR on the grid's edge is not a
   tuned one, so the held-out phase of that optimizer waits and the command exits 1 (``allow_edge=true`` goes on).
2. **Held-out**: each arm at its selected LR on ``seeds``, which must not hold a selection seed (a loss reported on
   the seeds that chose the LR is biased low by the choice). The statistics are over these seeds only.

A run's final loss is the mean of its last ``final_evals`` validation losses; a sweep run validates only there
(``train.eval_last``), a held-out run at every ``train.eval_every`` steps, for the gap's trend. The gap is arm -
baseline per held-out seed (the same seed: the same initialization and data order), reported as its mean with a 95%
t-interval and a verdict: ``LRM better`` (the interval below 0), ``no difference resolved`` (it holds 0),
``baseline better``. The gap against tokens is drawn with its 95% band, and its linear trend through the constant-LR
phase (the schedule's ``constant_phase``) is fitted per seed: ``growing``, ``flat``, ``shrinking`` or ``crossing``
with the slope's interval.

The arms (the paper's Fig. 7 tiers: untuned or tuned multipliers, with or without LRM): every arm runs at the tuned
baseline's values (``tuned_config``: ``configs/tuned/<name>.yaml``, written by the tune command) except the ``untuned``
ones, at the muP-transferred values; a ``transplant`` arm is a baseline whose fixed multipliers are the per-role
scales that its LRM arm learned at its selected LR on the selection seeds (``models.static_transplant``), so its
sweep is planned once that arm's has selected. ``pairs`` names the [arm, reference] pairs given a paired gap.

Every run goes through the trainer, in its own run directory ``<out_dir>/runs/<arm>-<optimizer>-lr<lr>-s<seed>``
(its LR and seed are its identity, whichever phase planned it). Arms may differ in multipliers only (``ARM_FREE``:
LRM's, the model's forward multipliers, the optimizer's LR and WD multipliers): every run has the same shapes, data
order (per seed), token budget, schedule and optimizer settings, and the command refuses an arm that changes them,
naming the key. The report gives each run's equilibration times (the weight decay's, ``optim.equilibration_times``)
and warns below 1. A rerun skips finished runs and resumes unfinished ones (see ``runner.py``); ``report=only``
rebuilds the report from whatever has finished.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
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
from lrm_train.experiments.experiment import Experiment, ExperimentFailed, ExperimentSettings
from lrm_train.experiments.report import markdown_table, write_report
from lrm_train.experiments.results import (
    RunResult,
    best_lrs,
    collect,
    finite,
    gap_curve,
    gap_trend,
    lr_table,
    mean_std,
    paired_gap,
    tokens_at_step,
)
from lrm_train.experiments.runner import (
    DIVERGED,
    FINISHED,
    RunSpec,
    make_run,
)
from lrm_train.experiments.tune import TUNED_DIR
from lrm_train.models import static_transplant
from lrm_train.nn import Placement
from lrm_train.optim import constant_phase, decay_start, equilibration_times
from lrm_train.train.callbacks import validation_steps
from lrm_train.train.checkpoint import complete_checkpoints, model_from_checkpoint
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
    lr_points: int = 3  # LRs per grid, sqrt(2) apart, centred on lr_center; 3 or more for an interior optimum
    selection_seeds: list[int] = field(default_factory=lambda: [0])  # the LR sweep's seeds
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])  # held-out: the seeds the statistics are over
    final_evals: int = 3  # a run's final loss: the mean of its last final_evals validation losses
    allow_edge: bool = False  # go on to the held-out phase even where a selected LR is on the grid's edge
    train: list[str] = field(default_factory=list)  # trainer overrides every run shares: model, data, budget, schedule
    train_extra: list[str] = field(default_factory=list)  # more of them, from the command line (e.g. data.source)
    # The tuned baseline's values (configs/tuned/<name>.yaml, written by the tune command), for every arm but the
    # `untuned` ones; null: every arm at the muP-transferred values of the `train` model.
    tuned_config: str | None = None
    untuned: list[str] = field(default_factory=list)  # arms at the muP-transferred values (Fig. 7's untuned tier)
    # transplant arm -> the LRM arm whose learned per-role scales it takes as fixed multipliers (static_transplant)
    transplant: dict[str, str] = field(default_factory=dict)
    # [arm, reference] pairs given a paired gap; empty: every arm against the baseline
    pairs: list[list[str]] = field(default_factory=list)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.baseline not in self.arms:
            raise ValueError(f"baseline={self.baseline!r} is not one of the arms ({', '.join(self.arms) or 'none'})")
        check_lr_center(self.lr_center, self.optimizers)
        if self.lr_points < 1:
            raise ValueError(f"lr_points={self.lr_points} must be >= 1")
        for key in ("selection_seeds", "seeds"):
            seeds = list(getattr(self, key))
            if not seeds or len(set(seeds)) != len(seeds):
                raise ValueError(f"{key}={seeds} must be distinct and at least one")
        if shared := sorted(set(self.seeds) & set(self.selection_seeds)):
            raise ValueError(
                f"seeds={list(self.seeds)} holds the selection seed {shared[0]}: the held-out seeds must not be ones "
                "the LR was selected on"
            )
        if self.final_evals < 1:
            raise ValueError(f"final_evals={self.final_evals} must be >= 1")
        if self.tuned_config is not None and not (TUNED_DIR / f"{self.tuned_config}.yaml").is_file():
            raise ValueError(
                f"tuned_config={self.tuned_config}: there is no {TUNED_DIR / self.tuned_config}.yaml: tune the "
                "baseline first (python -m lrm_train.experiments.tune), or tuned_config=null to compare at the "
                "muP-transferred values"
            )
        named = [(f"untuned={list(self.untuned)}", arm) for arm in self.untuned]
        named += [(f"transplant.{arm}={source}", a) for arm, source in self.transplant.items() for a in (arm, source)]
        named += [(f"pairs={[list(p) for p in self.pairs]}", arm) for pair in self.pairs for arm in pair]
        for key, arm in named:
            if arm not in self.arms:
                raise ValueError(f"{key}: {arm!r} is not one of the arms ({', '.join(self.arms)})")
        for arm, source in self.transplant.items():
            if source in self.transplant:
                raise ValueError(f"transplant.{arm}={source}: {source} is a transplant itself; name an LRM arm")
        for pair in self.pairs:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"pairs: {list(pair)} must be two different arms, [arm, reference]")

    def compared(self) -> list[tuple[str, str]]:
        """The (arm, reference) pairs the report gives a paired gap for."""
        if self.pairs:
            return [(arm, reference) for arm, reference in self.pairs]
        return [(arm, self.baseline) for arm in self.arms if arm != self.baseline]

    def tier(self, arm: str, lrm: bool) -> str:
        """The arm's tier in the paper's Fig. 7 (untuned or tuned multipliers, with or without LRM)."""
        tuned = "tuned" if self.tuned_config is not None and arm not in self.untuned else "untuned"
        if arm in self.transplant:
            return f"{tuned}, without LRM: {self.transplant[arm]}'s learned scales as fixed multipliers"
        return f"{tuned}, {'with' if lrm else 'without'} LRM"


def arm_overrides(overrides: list[str]) -> list[str]:
    """Command-line overrides with ``arms.NAME=[...]`` as Hydra's ``++arms.NAME=[...]``: it adds the arm NAME, or
    replaces it when the experiment has one. Hydra refuses a new key without ``+`` and an existing one with it, and
    arms are an open set; every other key keeps Hydra's checks, so a typo in it is still refused."""
    return [f"++{o}" if o.startswith("arms.") else o for o in overrides]


def check_lr_center(lr_center: dict[str, float], optimizers: list[str]) -> None:
    """Every optimizer has a positive LR at the centre of its grid."""
    missing = [o for o in optimizers if o not in lr_center]
    if missing:
        raise ValueError(f"lr_center has no LR for optimizer {missing[0]!r}")
    for optimizer, lr in lr_center.items():
        if lr <= 0:
            raise ValueError(f"lr_center.{optimizer}={lr} must be > 0")


def lr_grid(center: float, points: int) -> list[float]:
    """``points`` LRs on sqrt(2) steps around ``center`` (an even count puts the extra point above it)."""
    low = -((points - 1) // 2)
    return [center * math.sqrt(2) ** k for k in range(low, low + points)]


SELECTION, HELD_OUT = "selection", "held_out"  # a run's phase label


def _run(
    cfg: CompareConfig,
    arm: str,
    optimizer: str,
    lr: float | None,
    seed: int,
    phase: str,
    waiting_for: str = "",
    multipliers: dict | None = None,
) -> RunSpec:
    """One run of ``arm``; ``lr`` None: the held-out LR its sweep has not selected yet (the run waits, composed at the
    grid's centre as a stand-in); ``multipliers``: model fields the arm takes on top of its overrides (a
    transplant's)."""
    name = f"{arm}-{optimizer}-" + ("lr_selected" if lr is None else f"lr{lr:.3g}") + f"-s{seed}"
    tuned = [f"+tuned={cfg.tuned_config}"] if cfg.tuned_config is not None and arm not in cfg.untuned else []
    overrides = [
        *cfg.train,
        *cfg.train_extra,
        *tuned,
        *cfg.arms[arm],
        *(f"model.{key}={value!r}" for key, value in (multipliers or {}).items()),
        f"optim={optimizer}",
        f"optim.lr={cfg.lr_center[optimizer] if lr is None else lr!r}",
        f"logging.wandb.group={cfg.name}",
        # A sweep run is read by its final loss alone; the held-out runs validate all along, for the gap's trend.
        *([f"train.eval_last={cfg.final_evals}"] if phase == SELECTION else []),
    ]
    labels = dict(arm=arm, optimizer=optimizer, lr=lr, phase=phase)
    return make_run(name, Path(cfg.out_dir) / "runs" / name, overrides, waiting_for, seed=seed, **labels)


def _sweep(cfg: CompareConfig, arms: list[str], optimizers: list[str], **run_args) -> list[RunSpec]:
    """The LR sweep of ``arms`` on the selection seeds, in the order that gives a comparison soonest when the runs go
    one after another: the grid's centre LR first, and each arm beside the others at the same optimizer, LR and
    seed."""
    runs = []
    for k in sorted(range(cfg.lr_points), key=lambda k: abs(k - (cfg.lr_points - 1) // 2)):
        for optimizer in optimizers:
            lr = lr_grid(cfg.lr_center[optimizer], cfg.lr_points)[k]
            for seed in cfg.selection_seeds:
                runs += [_run(cfg, arm, optimizer, lr, seed, SELECTION, **run_args) for arm in arms]
    return runs


def plan(cfg: CompareConfig) -> list[RunSpec]:
    """Every run of the comparison, composed (a bad override fails here, before any training): the LR sweep on the
    selection seeds, then the held-out runs, each at its arm's selected LR once the sweep has selected one (until
    then a held-out run waits, composed at the grid's centre so that it is checked and counted). A transplant arm's
    sweep waits for its LRM arm's selected runs, whose learned multipliers it takes (composed until then without
    them)."""
    sweep = _sweep(cfg, [arm for arm in cfg.arms if arm not in cfg.transplant], cfg.optimizers)
    results = collect(sweep, cfg.final_evals)
    chosen = selections(cfg, results)
    folded = {}  # (transplant arm, optimizer) -> the model fields it takes
    for arm, source in cfg.transplant.items():
        _check_has_multipliers(arm, source, sweep)
        for optimizer in cfg.optimizers:
            waiting, folded[(arm, optimizer)] = _transplanted(cfg, chosen[(source, optimizer)], source, optimizer)
            runs = _sweep(cfg, [arm], [optimizer], waiting_for=waiting, multipliers=folded[(arm, optimizer)])
            sweep += runs
            results += collect(runs, cfg.final_evals)
    chosen = selections(cfg, results)
    held_out = []
    for optimizer in cfg.optimizers:
        waiting = _held_out_waits_for(cfg, chosen, optimizer)
        for seed in cfg.seeds:
            for arm in cfg.arms:
                lr = None if waiting else chosen[(arm, optimizer)]["lr"]
                multipliers = folded.get((arm, optimizer))
                held_out.append(_run(cfg, arm, optimizer, lr, seed, HELD_OUT, waiting, multipliers))
    runs = sweep + held_out
    check_same_budget(runs)
    t = runs[0].cfg.train
    evaluations = len(validation_steps(t.max_steps, t.eval_every))
    if cfg.final_evals > evaluations:
        raise ValueError(f"final_evals={cfg.final_evals}: a run evaluates only {evaluations} times (train.eval_every)")
    return runs


def _check_has_multipliers(arm: str, source: str, runs: list[RunSpec]) -> None:
    run = next(r for r in runs if r.labels["arm"] == source)
    if run.cfg.lrm.placement is Placement.none:
        raise ValueError(f"transplant.{arm}={source}: arm {source} has no learnable multipliers (lrm=none)")


def _transplanted(cfg: CompareConfig, chosen: dict, source: str, optimizer: str) -> tuple[str, dict | None]:
    """(what the transplant waits for, "" when nothing; the model fields it takes): the learned scales of ``source``'s
    runs at its selected LR on the selection seeds, folded into fixed multipliers (``models.static_transplant``)."""
    if not chosen["finished"]:
        return f"the LR sweep of {source} ({optimizer}), whose learned multipliers it takes", None
    if chosen["lr"] is None:
        return f"an LR of {source} ({optimizer}) that does not diverge, whose learned multipliers it takes", None
    if chosen["edge"] and not cfg.allow_edge:
        return f"an interior best LR of {source} ({optimizer}), whose learned multipliers it takes", None
    runs = [_run(cfg, source, optimizer, chosen["lr"], seed, SELECTION) for seed in cfg.selection_seeds]
    models = [model_from_checkpoint(complete_checkpoints(r.run_dir)[-1]) for r in runs]
    return "", static_transplant(models)


def selections(cfg: CompareConfig, results: list[RunResult]) -> dict[tuple[str, str], dict]:
    """(arm, optimizer) -> its sweep's outcome: ``lr`` (the lowest mean final loss over the selection seeds,
    diverged LRs excluded; None until every LR has finished or diverged on every selection seed, or when all
    diverged), ``finished`` and ``edge`` (the LR is the grid's first or last: the optimum may lie outside it; a grid
    of fewer than 3 LRs has no inside)."""
    sweep = [r for r in results if r.run.labels["phase"] == SELECTION]
    table = lr_table(sweep)
    best = best_lrs(table)
    outcome = {}
    for optimizer in cfg.optimizers:
        grid = lr_grid(cfg.lr_center[optimizer], cfg.lr_points)
        for arm in cfg.arms:
            by_lr = table.get((arm, optimizer), {})
            done = all(set(cfg.selection_seeds) <= set(by_lr.get(lr, {})) for lr in grid)
            lr = best.get((arm, optimizer)) if done else None
            edge = lr is not None and (cfg.lr_points < 3 or lr in (grid[0], grid[-1]))
            outcome[(arm, optimizer)] = dict(lr=lr, finished=done, edge=edge)
    return outcome


def _held_out_waits_for(cfg: CompareConfig, chosen: dict, optimizer: str) -> str:
    """What the held-out runs of ``optimizer`` wait for ("" when nothing: they can train)."""
    arms = [(arm, chosen[(arm, optimizer)]) for arm in cfg.arms]
    if unfinished := [arm for arm, c in arms if not c["finished"]]:
        return f"the LR sweep of {', '.join(unfinished)} ({optimizer}) on seeds {list(cfg.selection_seeds)}"
    if diverged := [arm for arm, c in arms if c["lr"] is None]:
        return f"an LR that does not diverge: every LR of {', '.join(diverged)} ({optimizer}) diverged"
    if not cfg.allow_edge and (edge := [arm for arm, c in arms if c["edge"]]):
        return (
            f"an interior best LR: that of {', '.join(edge)} ({optimizer}) is on the grid's edge (widen the grid, or "
            "allow_edge=true to go on)"
        )
    return ""


# What an arm may change: the multipliers the paper tunes (the model's forward multipliers, the optimizer's LR and WD
# multipliers per class and role) and LRM's own; a run's LR and seed are its identity; where it validates depends on
# its phase and does not change its training.
ARM_FREE = re.compile(
    r"model\.\w+_multipliers?|optim\.(lr|\w+\.(lr|wd)_mult|roles|multiplier_weight_decay)"
    r"|train\.(seed|run_dir|eval_last)"
)


def _flat(node, prefix: str) -> dict:
    if dataclasses.is_dataclass(node):
        node = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    if not isinstance(node, dict):
        return {prefix: node}
    return {key: value for name, child in node.items() for key, value in _flat(child, f"{prefix}.{name}").items()}


def _shared(run: RunSpec) -> dict:
    """The settings every run of the comparison (with its optimizer) must share, by dotted key."""
    sections = {name: getattr(run.cfg, name) for name in ("model", "data", "schedule", "train", "optim")}
    flat = {key: value for name, section in sections.items() for key, value in _flat(section, name).items()}
    return {key: value for key, value in flat.items() if not ARM_FREE.fullmatch(key)}


def check_same_budget(runs: list[RunSpec]) -> None:
    """Every run must see the same shapes, data, token budget, schedule and optimizer settings (per optimizer); an arm
    may change only multipliers (``ARM_FREE``). One line names the first key that differs."""
    firsts: dict = {}
    for run in runs:
        shared = _shared(run)
        first, first_shared = firsts.setdefault(run.cfg.optim.name, (run, shared))
        for key, value in shared.items():
            if value != first_shared[key]:
                section = key.split(".")[0]
                raise ValueError(
                    f"run {run.name} has another {section} config than {first.name}: {key}={value!r}, not "
                    f"{first_shared[key]!r}; an arm may change only multipliers (the model's, the optimizer's LR/WD "
                    "ones, LRM's), not shapes, data, token budget or schedule (put those overrides in `train`)"
                )
    t = runs[0].cfg.train
    if t.eval_every % t.log_every:
        raise ValueError(
            f"train.eval_every={t.eval_every} must be a multiple of train.log_every={t.log_every}, so that every "
            "validation loss is logged with its tokens_seen"
        )


# The report.


def held_out_table(results: list[RunResult]) -> dict:
    """(arm, optimizer) -> seed -> the held-out result (every held-out run of an arm is at its selected LR)."""
    table: dict = {}
    for r in results:
        if r.run.labels["phase"] == HELD_OUT:
            table.setdefault(r.label, {})[r.run.labels["seed"]] = r
    return table


def shown_runs(results: list[RunResult], summary: dict) -> dict:
    """(arm, optimizer) -> seed -> the runs the figures show: the held-out ones, or before them the sweep's runs at
    the selected LR."""
    shown = held_out_table(results)
    sweep = lr_table([r for r in results if r.run.labels["phase"] == SELECTION])
    for row in summary["rows"]:
        label = (row["arm"], row["optimizer"])
        if label not in shown and row["selected_lr"] is not None:
            shown[label] = sweep[label][row["selected_lr"]]
    return shown


def summarize(cfg: CompareConfig, results: list[RunResult]) -> dict:
    """Every number the report shows."""
    chosen = selections(cfg, results)
    table = lr_table([r for r in results if r.run.labels["phase"] == SELECTION])
    held_out = held_out_table(results)
    rows = []
    for optimizer in cfg.optimizers:
        for arm in cfg.arms:
            by_lr = table.get((arm, optimizer), {})
            lr_curve = []
            for lr in sorted(by_lr):
                finals = [r.final for r in by_lr[lr].values()]
                diverged = not all(finite(f) for f in finals)
                mean, std = (None, None) if diverged else mean_std(finals)
                lr_curve.append(dict(lr=lr, mean=mean, std=std, seeds=sorted(by_lr[lr]), diverged=diverged))
            finite_means = [p["mean"] for p in lr_curve if p["mean"] is not None]
            c = chosen[(arm, optimizer)]
            row = dict(
                arm=arm,
                optimizer=optimizer,
                lr_curve=lr_curve,
                lr_range=max(finite_means) - min(finite_means) if len(finite_means) > 1 else None,
                selected_lr=c["lr"],
                at_grid_edge=c["edge"],
                sweep_finished=c["finished"],
            )
            runs = held_out.get((arm, optimizer), {})
            row["held_out"] = dict(
                seeds=sorted(runs),
                finals=[runs[s].final for s in sorted(runs)],
                diverged=[s for s in sorted(runs) if not finite(runs[s].final)],
                run_dirs=[str(runs[s].run.run_dir) for s in sorted(runs)],
            )
            kept = [f for f in row["held_out"]["finals"] if finite(f)]
            row["held_out"]["mean"], row["held_out"]["std"] = mean_std(kept) if kept else (None, None)
            rows.append(row)
    gaps = []
    for optimizer in cfg.optimizers:
        for arm, reference in cfg.compared():
            arm_runs, reference_runs = held_out.get((arm, optimizer), {}), held_out.get((reference, optimizer), {})
            if gap := _gap(arm_runs, reference_runs):
                diverged = sorted(s for s, r in {**reference_runs, **arm_runs}.items() if not finite(r.final))
                gaps.append(dict(arm=arm, reference=reference, optimizer=optimizer, diverged=diverged, **gap))
    runs = [_run_line(r) for r in results]
    return dict(experiment=cfg.name, baseline=cfg.baseline, runs=runs, rows=rows, gaps=gaps)


def matrix_equilibration_times(run: RunSpec) -> float:
    """The equilibration times of the run's matrix class (``optim.equilibration_times``; its width factors on LR
    and WD cancel in their product)."""
    o, t = run.cfg.optim, run.cfg.train
    lr, wd = o.lr * o.matrix.lr_mult, o.weight_decay * o.matrix.wd_mult
    return equilibration_times(run.cfg.schedule, t.max_steps, t.grad_accum, lr, wd)


def _run_line(r: RunResult) -> dict:
    return dict(name=r.run.name, status=r.status, final_val_loss=r.final, run_dir=str(r.run.run_dir), **r.run.labels)


def _gap(arm_runs: dict, base_runs: dict) -> dict | None:
    """The held-out gap of an arm: paired final gap with its interval and verdict, the curve against tokens, and
    its trend through the constant-LR phase."""
    final = paired_gap({s: r.final for s, r in arm_runs.items()}, {s: r.final for s, r in base_runs.items()})
    if final is None:
        return None
    finished = set(final["seeds"])
    curve = gap_curve({s: arm_runs[s] for s in finished}, {s: base_runs[s] for s in finished})
    first = base_runs[final["seeds"][0]]
    t = first.run.cfg.train
    decay_tokens = tokens_at_step(first.records, decay_start(first.run.cfg.schedule, t.max_steps))
    phase = constant_phase(first.run.cfg.schedule, t.max_steps)
    trend = None
    if phase is not None:
        start, end = (tokens_at_step(first.records, step) for step in phase)
        trend = gap_trend(curve, start, end if end is not None else math.inf)
    return dict(**final, curve=curve, trend=trend, decay_start_tokens=decay_tokens)


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


def add_downstream(cfg: CompareConfig, shown: dict, summary: dict) -> list[str]:
    """Each row's downstream scores (mean over the shown runs' seeds); returns the score names, in column order."""
    names: set[str] = set()
    for row in summary["rows"]:
        runs = shown.get((row["arm"], row["optimizer"]))
        if not runs:
            continue
        per_seed = [downstream_scores(r.run, cfg.downstream) for r in runs.values() if finite(r.final)]
        if per_seed:
            row["downstream"] = {k: mean_std([s[k] for s in per_seed])[0] for k in per_seed[0]}
            names |= set(row["downstream"])
    return sorted(names)


def edge_words(rows: list[dict], lr_points: int, allow_edge: bool) -> str:
    """The sweep's warnings: selected LRs on the grid's edge (loudly: such a baseline is not tuned), sweeps not
    finished."""
    words = []
    edge = [f"{r['arm']} ({r['optimizer']}, {r['selected_lr']:.3g})" for r in rows if r["at_grid_edge"]]
    if edge:
        why = (
            f"a grid of {lr_points} LR{'s' if lr_points > 1 else ''} has no inside"
            if lr_points < 3
            else "the optimum may lie outside the grid"
        )
        then = (
            "`allow_edge=true`: the held-out phase ran anyway, so read its gap as that of an untuned arm"
            if allow_edge
            else "the held-out phase of that optimizer did not run"
        )
        words.append(
            f"**WARNING: selected LR on the edge of the grid for {', '.join(edge)}**: {why}, so that arm is not "
            f"tuned and a gap against it says nothing about a tuned one; {then}. Widen the grid (`lr_points`, "
            "`lr_center`): the finished runs are kept."
        )
    unfinished = [f"{r['arm']} ({r['optimizer']})" for r in rows if not r["sweep_finished"]]
    if unfinished:
        words.append(f"The LR sweep has not finished for {', '.join(unfinished)}: no LR selected yet.")
    return " ".join(words) or "Every selected LR lies inside its grid."


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f} (1 seed)"


def _interval(ci: list[float] | None) -> str:
    return "-" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def gap_words(g: dict) -> str:
    """One line per compared pair: the paired final gap, its interval and verdict, and the constant-phase trend."""
    head = f"- **{g['arm']} vs {g['reference']}, {g['optimizer']}** ({len(g['seeds'])} held-out seeds"
    head += f"; diverged: {g['diverged']})" if g["diverged"] else ")"
    if g["verdict"] is None:
        final = f"final gap {g['mean']:+.4f} on one seed: no interval, no verdict (add held-out `seeds`)"
    else:
        final = f"final gap {g['mean']:+.4f}, 95% CI {_interval(g['ci95'])}: **{g['verdict']}**"
    trend = g["trend"]
    if trend is None:
        phase = "no trend: fewer than 3 evaluations in a constant-LR phase"
    else:
        span = trend["last_tokens"] - trend["first_tokens"]
        change = [v * span for v in trend["ci95"]]
        phase = (
            f"through the constant-LR phase ({trend['points']} evaluations, {trend['first_tokens']:,.0f} to "
            f"{trend['last_tokens']:,.0f} tokens, mean gap {trend['mean_gap']:+.4f}) the gap changed by "
            f"{trend['slope'] * span:+.4f}, 95% CI {_interval(change)}: **{trend['trend']}**"
        )
    return f"{head}: {final}; {phase}."


def _mean_and_interval(g: dict | None) -> str:
    if g is None:
        return "-"
    return f"{g['mean']:+.4f} {_interval(g['ci95'])}" if g["ci95"] else f"{g['mean']:+.4f} (1 seed)"


def build_report(cfg: CompareConfig, runs: list[RunSpec]) -> Path:
    results = collect(runs, cfg.final_evals)
    if not any(r.status == FINISHED for r in results):
        raise RuntimeError(f"no finished run under {cfg.out_dir}/runs yet: nothing to report")
    out = Path(cfg.out_dir)
    summary = summarize(cfg, results)
    shown = shown_runs(results, summary)
    sweep_table = lr_table([r for r in results if r.run.labels["phase"] == SELECTION])
    first = runs[0].cfg
    figures = dict(
        val_loss=plot_val_curves(out, cfg, shown, summary),
        gap=plot_gap(out, cfg, summary),
        lr_sensitivity=plot_lr_sensitivity(out, cfg, summary),
        multipliers=plot_multipliers(out, shown, summary),
        norms_abm=plot_norms(out, shown, summary),
    )
    summary["figures"] = figures
    summary["settings"] = dict(
        arms=cfg.arms,
        tuned_config=cfg.tuned_config,
        untuned=cfg.untuned,
        transplant=cfg.transplant,
        pairs=cfg.compared(),
        optimizers=cfg.optimizers,
        lr_grids={o: lr_grid(cfg.lr_center[o], cfg.lr_points) for o in cfg.optimizers},
        selection_seeds=cfg.selection_seeds,
        seeds=cfg.seeds,
        final_evals=cfg.final_evals,
        val_windows=first.data.val_windows,
        allow_edge=cfg.allow_edge,
        train=cfg.train,
        max_steps=first.train.max_steps,
    )
    scores = add_downstream(cfg, shown, summary) if cfg.downstream.tasks else []
    sweep_lrs = sorted({lr for by_lr in sweep_table.values() for lr in by_lr})
    sweep_header = ["arm", "optimizer", *(f"lr {lr:.3g}" for lr in sweep_lrs)]
    sweep_lines = []
    for row in summary["rows"]:
        by_lr = {p["lr"]: p for p in row["lr_curve"]}
        cells = []
        for lr in sweep_lrs:
            p = by_lr.get(lr)
            cell = "-" if p is None else "diverged" if p["diverged"] else f"{p['mean']:.4f}"
            cells.append(f"**{cell}**" if lr == row["selected_lr"] else cell)
        sweep_lines.append([row["arm"], row["optimizer"], *cells])
    tiers = {arm: cfg.tier(arm, run.cfg.lrm.placement is not Placement.none) for arm, run in _first_runs(runs).items()}
    summary["tiers"] = tiers
    header = ["arm", "tier", "optimizer", "LR", "held-out final loss (mean ± std)", "seeds", *scores]
    lines = []
    for row in summary["rows"]:
        h = row["held_out"]
        lines.append(
            [
                row["arm"],
                tiers[row["arm"]],
                row["optimizer"],
                row["selected_lr"],
                _pm(h["mean"], h["std"]),
                len(h["seeds"]),
                *(row.get("downstream", {}).get(name) for name in scores),
            ]
        )
    gap_lines = [
        [
            f"{g['arm']} - {g['reference']}",
            g["optimizer"],
            _mean_and_interval(g),
            g["verdict"] or "-",
            "-" if g["trend"] is None else g["trend"]["trend"],
        ]
        for g in summary["gaps"]
    ]
    gap_header = ["pair (arm - reference)", "optimizer", "gap (mean, 95% CI)", "verdict", "constant-phase trend"]
    summary["transplants"] = transplants(cfg, runs)
    summary["equilibration"] = equilibration(runs)
    finished = sum(r.status == FINISHED for r in results)
    diverged = [r.run.name for r in results if r.status == DIVERGED]
    waiting = sum(bool(r.waiting_for) for r in runs)
    md = [
        f"{finished} of {len(runs)} runs finished"
        + (f"; diverged: {', '.join(diverged)}" if diverged else "")
        + (f"; {waiting} held-out runs wait for their LR" if waiting else "")
        + ".",
        edge_words(summary["rows"], cfg.lr_points, cfg.allow_edge),
        (
            f"Each run: {first.train.max_steps} steps of {first.train.micro_batch_size * first.train.grad_accum} x "
            f"{first.data.seq_len} tokens per process, a model {first.model.hidden_size} wide with "
            f"{first.model.num_hidden_layers} layers, schedule `{first.schedule.name}`; the shared trainer "
            f"overrides are `{' '.join(cfg.train)}`. A run's final loss is the mean of its last {cfg.final_evals} "
            f"validation losses on {first.data.val_windows} windows of {first.data.seq_len} tokens."
        ),
        "## 1. LR sweep on the selection seeds",
        (
            f"Final loss (mean over seeds {list(cfg.selection_seeds)}) at each LR of the grid (sqrt(2) apart; bold: "
            "the selected LR, the lowest). The selected LR must lie inside the grid: one on its edge is not a tuned "
            "one. These seeds choose the LR and are not used below."
        ),
        markdown_table(sweep_header, sweep_lines),
        "## 2. Held-out seeds at the selected LRs",
        markdown_table(header, lines),
        (
            "Tiers as in the paper's Fig. 7: `tuned` arms run at the tuned baseline's values "
            + (f"(`configs/tuned/{cfg.tuned_config}.yaml`)" if cfg.tuned_config else "(none here: `tuned_config=null`)")
            + ", `untuned` ones at the muP-transferred values; with or without learnable multipliers."
        ),
        markdown_table(gap_header, gap_lines) if gap_lines else "No pair has a held-out seed both arms finished.",
        (
            f"Held-out seeds {list(cfg.seeds)}. The gap is the arm's final loss minus the reference's, paired by seed "
            "(the same seed: the same initialization and data order); its 95% interval is Student's t over the "
            "seeds. Verdict: `LRM better` when the interval lies below 0 (the arm is better), `baseline better` "
            "above it (the reference is), `no difference resolved` when it holds 0. The trend is the gap's "
            "straight-line slope through the constant-LR phase (after the warmup, before the decay), fitted per "
            "seed and averaged with its 95% "
            "interval over the seeds: `growing` when the gap's size grows (the slope has the sign of the gap), "
            "`shrinking` when it falls, `crossing` when the fitted line changes sign inside the phase (the leader "
            "changes), `flat` when the interval holds 0; the paper finds LRM's gap growing through "
            "the constant phase."
        ),
        "\n".join(gap_words(g) for g in summary["gaps"]),
        *transplant_words(summary["transplants"]),
        "## 3. Equilibration times",
        equilibration_words(summary["equilibration"]),
        "## Figures",
        (
            f"![validation loss]({figures['val_loss']})\n\nValidation loss against tokens for each arm at its "
            "selected LR, over the held-out seeds (band: ± std over seeds)."
        ),
        (
            f"![gap]({figures['gap']})\n\nThe gap against tokens, paired by held-out seed: the mean, its 95% band, "
            "and the fitted trend through the constant-LR phase (dashed); dotted line: the LR decay starts."
        ),
        (f"![LR sensitivity]({figures['lr_sensitivity']})\n\nThe sweep: final loss against LR on the selection seeds."),
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
            f"Downstream scores (`{'`, `'.join(scores)}`) are each arm's final checkpoints at its selected LR "
            f"scored by `lrm_train.eval` (mean over held-out seeds; limit {cfg.downstream.limit or 'none'} items per "
            "task)."
        )
    md.append("Every number above is in `report.json`.")
    path = write_report(out, f"{cfg.name}: LRM vs muP", "\n\n".join(md), summary)
    if failed := untuned(cfg, summary["rows"]):
        raise ExperimentFailed(f"{failed} (see {path})")
    return path


def _first_runs(runs: list[RunSpec]) -> dict[str, RunSpec]:
    """Arm -> its first planned run."""
    first: dict[str, RunSpec] = {}
    for run in runs:
        first.setdefault(run.labels["arm"], run)
    return first


def transplants(cfg: CompareConfig, runs: list[RunSpec]) -> list[dict]:
    """Per transplant arm and optimizer whose sweep is planned: the fixed multipliers it took from its LRM arm's
    selected runs, beside the values that arm started from."""
    found = []
    for arm, source in cfg.transplant.items():
        for optimizer in cfg.optimizers:
            run = next((r for r in runs if r.labels["arm"] == arm and r.labels["optimizer"] == optimizer), None)
            if run is None or run.waiting_for:
                continue
            start = next(r for r in runs if r.labels["arm"] == source and r.labels["optimizer"] == optimizer)
            found.append(
                dict(
                    arm=arm,
                    source=source,
                    optimizer=optimizer,
                    started_from=start.cfg.model.forward_multipliers(),
                    multipliers=run.cfg.model.forward_multipliers(),
                )
            )
    return found


def transplant_words(found: list[dict]) -> list[str]:
    words = []
    for t in found:
        lines = [
            [name, f"{value:.4g}", f"{t['multipliers'][name]:.4g}", f"x{t['multipliers'][name] / value:.3g}"]
            for name, value in t["started_from"].items()
        ]
        words += [
            (
                f"**{t['arm']} ({t['optimizer']})**: a baseline whose fixed multipliers are {t['source']}'s learned "
                "per-role scales (scalar x mean row x mean column over the muP value, geometric mean over layers and "
                "selection seeds, at its selected LR) folded into the values it started from: what LRM adds beyond "
                "finding a better static scale is its gap against this arm."
            ),
            markdown_table(["model field", f"{t['source']} started from", t["arm"], "factor"], lines),
        ]
    return words


def equilibration(runs: list[RunSpec]) -> list[dict]:
    """Equilibration times of the matrices' weight decay at each planned (arm, optimizer, LR): the same for every
    seed."""
    reached: dict[tuple, float] = {}
    for run in runs:
        if run.labels["lr"] is not None:
            reached[(run.labels["arm"], run.labels["optimizer"], run.labels["lr"])] = matrix_equilibration_times(run)
    return [dict(arm=a, optimizer=o, lr=lr, equilibration_times=t) for (a, o, lr), t in reached.items()]


def equilibration_words(reached: list[dict]) -> str:
    lines = [[e["arm"], e["optimizer"], f"{e['lr']:.3g}", f"{e['equilibration_times']:.2f}"] for e in reached]
    words = [
        (
            "Each run's sum over its steps of lr_t x wd for the matrices (the schedule's LR, the matrix class's LR "
            "and weight decay): the equilibration times it lasts, 1 / (lr x wd) steps each; the same for every seed. "
            "The paper's mechanism works through the equilibrium that weight decay and gradient noise set for the "
            "weight norms, reached after a few of them."
        ),
        markdown_table(["arm", "optimizer", "LR", "equilibration times"], lines),
    ]
    short = [e for e in reached if e["equilibration_times"] < 1]
    if short:
        words.append(
            f"**WARNING: {len(short)} of {len(reached)} arm x LR settings end before one equilibration time** "
            f"(as few as {min(e['equilibration_times'] for e in short):.2f}): their weight norms are still set by "
            "the init and early growth, not by the noise-WD equilibrium, so this comparison cannot show the "
            "paper's mechanism (experiment=compare_cpu_equilibrium reaches 3 or more)."
        )
    return "\n\n".join(words)


def untuned(cfg: CompareConfig, rows: list[dict]) -> str:
    """Why the comparison cannot stand (its exit status is then 1), or "": a selected LR on the grid's edge (unless
    ``allow_edge``), or a finished sweep whose every LR diverged."""
    edge = [f"{r['arm']} ({r['optimizer']})" for r in rows if r["at_grid_edge"]]
    diverged = [f"{r['arm']} ({r['optimizer']})" for r in rows if r["sweep_finished"] and r["selected_lr"] is None]
    reasons = []
    if edge and not cfg.allow_edge:
        reasons.append(f"selected LR on the grid's edge for {', '.join(edge)} (widen the grid, or allow_edge=true)")
    if diverged:
        reasons.append(f"every LR of the sweep diverged for {', '.join(diverged)}")
    return "; ".join(reasons)


COMPARE = Experiment("compare", CompareConfig, plan, build_report, __doc__, overrides=arm_overrides)
main = COMPARE.main


if __name__ == "__main__":
    sys.exit(main())
