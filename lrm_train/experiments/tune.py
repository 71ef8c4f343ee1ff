"""Tunes the muP baseline (``lrm=none``) the way Falcon-H1's was, scaled down: its LR and forward multipliers around
the muP-transferred values, selected on the selection seed(s) only, written as a config the trainer and ``compare``
take.

    python -m lrm_train.experiments.tune                          # experiment=tune_cpu: 2 CPU cores
    python -m lrm_train.experiments.tune experiment=tune_cpu_muon # the same under Muon (compare_cpu_muon's)
    python -m lrm_train.experiments.tune experiment=tune_0p5b     # the paper's scale (GPUs)
    python -m lrm_train.experiments.tune report=only              # rebuild the report from the finished runs
    python -m lrm_train.train +tuned=tune_cpu                     # train with the tuned values
    python -m lrm_train.experiments.compare tuned_config=tune_cpu lr_center.adamw=<tuned LR>   # compare_cpu's default

The search, one stage after another, each around the best point so far:
1. a 2-D grid of LR (``lr_ratio`` apart) x LM-head multiplier (factors of 2), ``grid_points`` each;
2. one axis at a time (``stage2``, in order), x0.5, x1, x2: ``embedding`` (its forward multiplier), ``residual``
   (the residual branches' outputs as one factor: attention_out, ssm_out and mlp down), ``key`` (the key
   multiplier), ``embedding_lr`` and ``lm_head_lr`` (the LR multipliers of those parameter classes).

An axis whose best point lies on its edge gets one more point beyond that edge, again and again, until the best is
inside or ``max_widen`` points were added; still on the edge, it is not tuned: the later stages wait, the report says
so and the command exits 1 (``allow_edge=true`` goes on with the edge value). Each stage is planned once the one
before it has finished (its runs wait until then, counted by ``--estimate``). A point's loss is the mean over the
selection seeds of each run's last ``final_evals`` validation losses; a run's directory is named by the point (its
offsets from the muP values), so a point reached twice trains once, a rerun skips finished runs and resumes the
others. The tuned values go to ``configs/tuned/<name>.yaml`` (a Hydra config the trainer takes as
``+tuned=<name>``), written only once every axis is tuned; the report (``<out_dir>/report.md``) draws each axis' curve.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from lrm_train.config_compose import CONFIG_DIR
from lrm_train.experiments.experiment import Experiment, ExperimentFailed, ExperimentSettings
from lrm_train.experiments.report import markdown_table, new_figure, save_figure, write_report
from lrm_train.experiments.results import collect, finite
from lrm_train.experiments.runner import FINISHED, RunSpec, make_run
from lrm_train.train import RunConfig
from lrm_train.utils import atomic_write_text

TUNED_DIR = CONFIG_DIR / "tuned"  # the trainer's config group `tuned`: +tuned=<name>
STAGE1 = ("lr", "lm_head")
OCTAVE_AXES = ("embedding", "residual", "key", "embedding_lr", "lm_head_lr")  # stage 2's axes, in their default order


def axis_values(cfg: RunConfig, axis: str, factor: float) -> dict[str, object]:
    """The trainer keys an axis sets, at ``factor`` times the values of ``cfg`` (the muP-transferred ones)."""
    m, o = cfg.model, cfg.optim
    if axis == "lr":
        return {"optim.lr": o.lr * factor}
    if axis == "lm_head":
        return {"model.lm_head_multiplier": m.lm_head_multiplier * factor}
    if axis == "embedding":
        return {"model.embedding_multiplier": m.embedding_multiplier * factor}
    if axis == "residual":  # the three branches that write into the residual stream, as one factor
        return {
            "model.attention_out_multiplier": m.attention_out_multiplier * factor,
            "model.ssm_out_multiplier": m.ssm_out_multiplier * factor,
            "model.mlp_multipliers": [m.mlp_multipliers[0], m.mlp_multipliers[1] * factor],
        }
    if axis == "key":
        return {"model.key_multiplier": m.key_multiplier * factor}
    if axis == "embedding_lr":
        return {"optim.embedding.lr_mult": o.embedding.lr_mult * factor}
    if axis == "lm_head_lr":
        return {"optim.lm_head.lr_mult": o.lm_head.lr_mult * factor}
    raise ValueError(f"unknown axis {axis!r}")


@dataclass
class TuneConfig(ExperimentSettings):
    """Settings of a tuning (``configs/experiment/tune_*.yaml`` fill them in; see ``configs/tune.yaml``)."""

    out_dir: str = "runs/${name}"
    name: str = "tune"  # also the tuned config's name: configs/tuned/<name>.yaml, +tuned=<name>
    optimizer: str = "adamw"
    lr_ratio: float = math.sqrt(2)  # between neighbouring LRs (the multipliers' axes are factors of 2)
    grid_points: int = 3  # per dimension of stage 1's LR x LM-head grid, centred on the muP values
    stage2: list[str] = field(default_factory=lambda: list(OCTAVE_AXES))  # one axis at a time, in this order
    max_widen: int = 2  # points an axis may add beyond its edges before it counts as not tuned
    selection_seeds: list[int] = field(default_factory=lambda: [0])
    final_evals: int = 2  # a run's loss: the mean of its last final_evals validation losses
    allow_edge: bool = False  # go on (and write the config) where an axis' best stays on its edge
    train: list[str] = field(default_factory=list)  # trainer overrides of every run: model, data, budget, schedule
    train_extra: list[str] = field(default_factory=list)  # more of them, from the command line (e.g. data.source)

    def __post_init__(self) -> None:
        super().__post_init__()
        if unknown := [a for a in self.stage2 if a not in OCTAVE_AXES]:
            raise ValueError(f"stage2 axis {unknown[0]!r} is not one of {', '.join(OCTAVE_AXES)}")
        if len(set(self.stage2)) != len(self.stage2):
            raise ValueError(f"stage2={list(self.stage2)} names an axis twice")
        if self.lr_ratio <= 1:
            raise ValueError(f"lr_ratio={self.lr_ratio} must be > 1")
        if self.grid_points < 3:
            raise ValueError(f"grid_points={self.grid_points} must be >= 3: a grid of fewer has no inside")
        if self.max_widen < 0:
            raise ValueError(f"max_widen={self.max_widen} must be >= 0")
        seeds = list(self.selection_seeds)
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"selection_seeds={seeds} must be distinct and at least one")
        if self.final_evals < 1:
            raise ValueError(f"final_evals={self.final_evals} must be >= 1")

    def ratio(self, axis: str) -> float:
        return self.lr_ratio if axis == "lr" else 2.0

    def stages(self) -> list[tuple[str, ...]]:
        return [STAGE1, *((axis,) for axis in self.stage2)]


Point = dict[str, int]  # axis -> offset from the muP value, in steps of the axis' ratio


@dataclass
class Stage:
    axes: tuple[str, ...]
    offsets: dict[str, list[int]]  # the offsets tried per axis, sorted
    losses: dict[tuple, float]  # point key -> mean loss (inf: diverged) of the stage's finished points
    best: Point | None = None  # None until every point has finished (or when all diverged)
    widened: dict[str, int] = field(default_factory=dict)
    edge: list[str] = field(default_factory=list)  # axes whose best stayed on an edge after max_widen


@dataclass
class Search:
    points: list[Point]  # every point to train so far, in order (the stages reached)
    stages: list[Stage]  # the stages reached
    waiting: str  # what the later stages wait for ("" when the search is done)
    best: Point  # the best point so far
    stuck: bool = False  # the wait cannot end by training: an axis on its edge (without allow_edge), all diverged


def point_key(point: Point) -> tuple:
    return tuple(sorted(point.items()))


def search(cfg: TuneConfig, loss: Callable[[Point], float | None]) -> Search:
    """Walk the stages as far as the losses known so far allow (``loss``: a point's mean loss, inf when it diverged,
    None until it has finished): each stage's points around the best so far, widened where its best is on an edge."""
    axes = [a for stage in cfg.stages() for a in stage]
    best: Point = dict.fromkeys(axes, 0)
    points: list[Point] = []
    stages: list[Stage] = []
    for stage_axes in cfg.stages():
        half = (cfg.grid_points if stage_axes == STAGE1 else 3) // 2
        width = cfg.grid_points if stage_axes == STAGE1 else 3
        offsets = {a: list(range(-half, width - half)) for a in stage_axes}
        stage = Stage(stage_axes, offsets, {}, widened=dict.fromkeys(stage_axes, 0))
        stages.append(stage)
        while True:
            grid = [{**best, **dict(zip(stage_axes, ks))} for ks in itertools.product(*offsets.values())]
            points += [p for p in grid if p not in points]
            known = {point_key(p): loss(p) for p in grid}
            stage.losses = {k: v for k, v in known.items() if v is not None}
            if len(stage.losses) < len(grid):
                return Search(points, stages, f"the {'x'.join(stage_axes)} sweep to finish", best)
            if not any(finite(v) for v in known.values()):
                why = f"a point that does not diverge: every {'x'.join(stage_axes)} point did"
                return Search(points, stages, why, best, stuck=True)
            stage_best = min(grid, key=lambda p: known[point_key(p)])
            grow = False
            for a in stage_axes:
                if stage.widened[a] < cfg.max_widen and stage_best[a] in (offsets[a][0], offsets[a][-1]):
                    offsets[a] = sorted({*offsets[a], stage_best[a] + (1 if stage_best[a] == offsets[a][-1] else -1)})
                    stage.widened[a] += 1
                    grow = True
            if not grow:
                break
        stage.best = stage_best
        stage.edge = [a for a in stage_axes if stage_best[a] in (offsets[a][0], offsets[a][-1])]
        best = stage_best
        if stage.edge and not cfg.allow_edge:
            why = (
                f"an interior optimum of {', '.join(stage.edge)} (on its edge after max_widen={cfg.max_widen} more "
                "points; allow_edge=true goes on)"
            )
            return Search(points, stages, why, best, stuck=True)
    return Search(points, stages, "", best)


def run_name(point: Point, seed: int) -> str:
    moved = "_".join(f"{a}{k:+d}" for a, k in point.items() if k)
    return f"{moved or 'mup'}-s{seed}"


class Planner:
    """Composes the runs of points (each once) and reads their losses; the muP values come from the base run."""

    def __init__(self, cfg: TuneConfig) -> None:
        self.cfg = cfg
        self.runs: dict[str, RunSpec] = {}
        zero = dict.fromkeys([a for stage in cfg.stages() for a in stage], 0)
        self.base = self.run(zero, cfg.selection_seeds[0]).cfg

    def values(self, point: Point) -> dict[str, object]:
        """The trainer keys of a point: each axis' keys at its factor from the muP values."""
        out: dict[str, object] = {}
        for axis, k in point.items():
            out.update(axis_values(self.base, axis, self.cfg.ratio(axis) ** k))
        return out

    def run(self, point: Point, seed: int, waiting_for: str = "") -> RunSpec:
        name = run_name(point, seed) if not waiting_for else f"{run_name(point, seed)}-waiting"
        if name not in self.runs:
            moved = {a: k for a, k in point.items() if k}  # the base run (none moved) gives the muP values
            overrides = [
                *self.cfg.train,
                *self.cfg.train_extra,
                "lrm=none",  # the muP baseline
                f"optim={self.cfg.optimizer}",
                *(f"{key}={value!r}" for key, value in (self.values(moved) if moved else {}).items()),
                f"logging.wandb.group={self.cfg.name}",
                f"train.eval_last={self.cfg.final_evals}",  # a run is read by its final loss alone
            ]
            run_dir = Path(self.cfg.out_dir) / "runs" / name
            self.runs[name] = make_run(name, run_dir, overrides, waiting_for, seed=seed, **point)
        return self.runs[name]

    def loss(self, point: Point) -> float | None:
        results = collect([self.run(point, s) for s in self.cfg.selection_seeds], self.cfg.final_evals)
        if len(results) < len(self.cfg.selection_seeds):
            return None
        finals = [r.final for r in results]
        return sum(finals) / len(finals) if all(finite(f) for f in finals) else math.inf


def plan_search(cfg: TuneConfig) -> tuple[list[RunSpec], Search, Planner]:
    planner = Planner(cfg)
    found = search(cfg, planner.loss)
    runs = [planner.run(p, s) for p in found.points for s in cfg.selection_seeds]
    if found.waiting:
        # The stages not reached, counted as planned: x0.5 and x2 around the best so far (x1 is that best's run).
        reached = {a for stage in found.stages for a in stage.axes}
        for axis in [a for a in cfg.stage2 if a not in reached]:
            for k in (-1, 1):
                for seed in cfg.selection_seeds:
                    runs.append(planner.run({**found.best, axis: k}, seed, waiting_for=found.waiting))
    return runs, found, planner


def plan(cfg: TuneConfig) -> list[RunSpec]:
    """Every run of the search so far, composed (a bad override fails here, before any training); the stages not yet
    reachable as waiting runs."""
    return plan_search(cfg)[0]


def worst_case(cfg: TuneConfig) -> str:
    """The runs of a search whose every axis widens ``max_widen`` times."""
    grid = (cfg.grid_points + cfg.max_widen) ** 2
    runs = (grid + len(cfg.stage2) * (2 + cfg.max_widen)) * len(cfg.selection_seeds)
    return f"at most {runs} runs if every axis widens max_widen={cfg.max_widen} times"


# The report.


def tuned_yaml(cfg: TuneConfig, values: dict[str, object], report: Path) -> str:
    nested: dict = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    header = (
        "# @package _global_\n"
        f"# The muP baseline (lrm=none) tuned by `python -m lrm_train.experiments.tune` ({cfg.name}, optimizer "
        f"{cfg.optimizer}, seeds {list(cfg.selection_seeds)}); report: {report}.\n"
        f"# Use: python -m lrm_train.train +tuned={cfg.name} (a key given there too wins over this file's);\n"
        f"# compare: tuned_config={cfg.name} with lr_center.<optimizer> at the tuned optim.lr (compare sets each\n"
        "# run's LR itself).\n"
    )
    return header + OmegaConf.to_yaml(OmegaConf.create(nested))


def axis_curve(stage: Stage, axis: str) -> list[tuple[int, float]]:
    """(offset, loss) along ``axis`` with the stage's other axes at their best."""
    assert stage.best is not None
    curve = []
    for key, value in stage.losses.items():
        point = dict(key)
        if all(point[a] == stage.best[a] for a in stage.axes if a != axis):
            curve.append((point[axis], value))
    return sorted(curve)


def plot_axis(out: Path, cfg: TuneConfig, stage: Stage, axis: str) -> str:
    curve = axis_curve(stage, axis)
    fig, (ax,) = new_figure(1, f"{cfg.name}: {axis}")
    factors = [cfg.ratio(axis) ** k for k, _ in curve]
    shown = [(f, v) for f, v in zip(factors, (v for _, v in curve)) if finite(v)]
    ax.plot([f for f, _ in shown], [v for _, v in shown], "o-")
    best = cfg.ratio(axis) ** stage.best[axis]
    ax.plot([best], [stage.losses[point_key(stage.best)]], "r*", markersize=14, label=f"best: x{best:.3g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"{axis}: factor on the muP value")
    ax.set_ylabel(f"final validation loss (mean of the last {cfg.final_evals})")
    ax.legend()
    return save_figure(fig, out / f"axis_{axis}.png")


def build_report(cfg: TuneConfig, runs: list[RunSpec]) -> Path:
    _, found, planner = plan_search(cfg)
    finished = sum(r.status == FINISHED for r in collect(runs))
    if not finished:
        raise RuntimeError(f"no finished run under {cfg.out_dir}/runs yet: nothing to report")
    out = Path(cfg.out_dir)
    done = [s for s in found.stages if s.best is not None]
    figures = {a: plot_axis(out, cfg, s, a) for s in done for a in s.axes}
    base_values = planner.values(dict.fromkeys(found.best, 0))
    values = planner.values(found.best)  # every tuned key, those left at x1 too: the config says what was tuned
    tuned_path = TUNED_DIR / f"{cfg.name}.yaml"
    report_path = out / "report.md"
    axes_rows, curves = [], {}
    for stage in found.stages:
        for a in stage.axes:
            curve = axis_curve(stage, a) if stage.best is not None else []
            curves[a] = [dict(factor=cfg.ratio(a) ** k, loss=v if finite(v) else None) for k, v in curve]
            best = None if stage.best is None else cfg.ratio(a) ** stage.best[a]
            cells = ", ".join(
                ("diverged" if not finite(v) else f"{v:.4f}") + f" @x{cfg.ratio(a) ** k:.3g}" for k, v in curve
            )
            state = "waiting" if stage.best is None else "EDGE (not tuned)" if a in stage.edge else "interior"
            axes_rows.append([a, best, stage.widened[a], state, cells or "-"])
    md = [
        f"{finished} of {len(runs)} runs finished"
        + (f"; the later stages wait for {found.waiting}" if found.waiting else "; every stage done")
        + f". Selection seeds {list(cfg.selection_seeds)}; optimizer {cfg.optimizer}; lrm=none.",
        "## Axes",
        (
            "Each axis' best factor on the muP-transferred value, the points it added beyond its first grid "
            f"(at most max_widen={cfg.max_widen}), whether its best is inside, and its curve (loss at each factor, "
            "the other axes at their best). An axis on its edge is not tuned."
        ),
        markdown_table(["axis", "best factor", "widened", "optimum", "loss @ factor"], axes_rows),
        "## Tuned values",
        markdown_table(
            ["key", "muP-transferred", "tuned"], [[k, str(base_values[k]), str(v)] for k, v in values.items()]
        ),
    ]
    edge = [a for s in found.stages for a in s.edge]
    write = not found.waiting  # only a finished search: a half-tuned config must not look like a tuned one
    if write:
        atomic_write_text(tuned_path, tuned_yaml(cfg, values, report_path))
        md.append(f"Written to `{tuned_path}`: `python -m lrm_train.train +tuned={cfg.name}`.")
        if edge:
            md.append(f"**WARNING: {', '.join(edge)} still on the edge (allow_edge=true): not tuned.**")
    else:
        md.append(f"**Not written: the search waits for {found.waiting}.**")
    md += ["## Figures", *(f"![{a}]({f})" for a, f in figures.items())]
    summary = dict(
        experiment=cfg.name,
        waiting=found.waiting,
        best=found.best,
        tuned=values,
        muP=base_values,
        tuned_config=str(tuned_path) if write else None,
        curves=curves,
        edge=edge,
        figures=figures,
    )
    path = write_report(out, f"{cfg.name}: the muP baseline tuned", "\n\n".join(md), summary)
    if found.stuck:
        raise ExperimentFailed(f"not tuned: the search waits for {found.waiting} (see {path})")
    return path


TUNE = Experiment("tune", TuneConfig, plan, build_report, __doc__, estimate_note=worst_case)
main = TUNE.main


if __name__ == "__main__":
    sys.exit(main())
