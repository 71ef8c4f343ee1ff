"""The one shape of every experiment (the comparison and each analysis): settings, a plan and a report.

- **settings**: a dataclass that extends ``ExperimentSettings`` (where the outputs go, how the runs are launched,
  whether to train or only report), composed by Hydra from ``configs/<name>.yaml`` like every command's config;
- **plan(settings)**: every training run, composed before any trains (a bad override fails first), each with the
  labels the report groups it by;
- **report(settings, runs)**: the report from the finished runs, its path returned.

``Experiment.main`` is then the whole command, the same for all of them::

    python -m lrm_train.experiments.<name> [experiment=<option>] [key=value ...] [--estimate]

``--estimate`` prints the GPU hours of the plan and exits; ``report=only`` rebuilds the report from the finished
runs; ``launcher=slurm`` submits a job per unfinished run and one for the report after them; ``nproc`` runs each
local run under torchrun; ``threads`` sets each run's torch threads (1 by default) and ``parallel=N`` trains N
local runs at once. A plan may hold runs that wait for others (``RunSpec.waiting_for``): they are trained once
those have finished and the plan is made again. A rerun skips finished runs and resumes the others; Ctrl-C and SIGTERM stop with the run in
progress saved, and running the same command goes on. Exit statuses are ``lrm_train.cli``'s.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import torch

from lrm_train.cli import CommandEnding, run_command
from lrm_train.config_compose import compose_schema
from lrm_train.experiments.runner import (
    FINISHED,
    PENDING,
    RunSpec,
    SlurmConfig,
    composed_once,
    create_out_dir,
    python_command,
    run_local,
    run_status,
    submit_slurm,
)
from lrm_train.models import FalconH1LM
from lrm_train.optim import micro_batches
from lrm_train.train.config import register_configs

AGAIN = "run the same command again to go on"  # what an interrupted or stopped experiment says: finished runs stay
# Typical of well-tuned bf16 training on H100s (e.g. torchtitan's 33-39%); not measured here.
ASSUMED_MFU = 0.35


class Launcher(StrEnum):
    local = "local"  # one run after another in this process (or under torchrun with nproc)
    slurm = "slurm"  # one sbatch job per run, and one for the report after them


class ReportMode(StrEnum):
    after = "after"  # train what is not finished, then report
    only = "only"  # rebuild the report from the finished runs


@dataclass
class ExperimentSettings:
    """What every experiment's settings share (each experiment's dataclass extends it)."""

    out_dir: str = "experiments/out"
    launcher: Launcher = Launcher.local
    nproc: int = 0  # local: processes per run (0: one per visible GPU; torchrun + DDP when more than one)
    threads: int = 1  # torch threads per process of a run (0: torch's default); 1: results the same at any load
    parallel: int = 1  # local: runs trained at once, each in its own process (e.g. one per core with threads=1)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    report: ReportMode = ReportMode.after

    def __post_init__(self) -> None:
        if self.nproc < 0:
            raise ValueError(f"nproc={self.nproc} must be >= 0 (0: one process per visible GPU)")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be >= 0 (0: torch's default)")
        if self.parallel < 1:
            raise ValueError(f"parallel={self.parallel} must be >= 1")
        if self.parallel > 1 and self.nproc > 1:
            raise ValueError(
                f"parallel={self.parallel} runs single-process runs side by side: not with nproc={self.nproc}"
            )


class ExperimentFailed(CommandEnding):
    """The experiment ran and its verdict is a failure (the report says why); it exits 1, as a failed check does."""

    exit_code = 1


@dataclass(frozen=True)
class Experiment:
    name: str  # the command (``lrm_train.experiments.<name>``) and its config (``configs/<name>.yaml``)
    settings: type  # an ExperimentSettings dataclass
    plan: Callable[..., list[RunSpec]]
    report: Callable[..., Path]
    doc: str
    # Command-line overrides as Hydra should read them (the comparison's ``arms.NAME=[...]``).
    overrides: Callable[[list[str]], list[str]] = list
    # What --estimate adds after the plan's count (the tuning's worst case, when its axes widen); None: nothing.
    estimate_note: Callable[..., str] | None = None

    def run(self, settings: ExperimentSettings) -> Path:
        """Train what the plan holds here, then report (``report=after``, ``launcher=local``)."""
        create_out_dir(settings.out_dir)
        return self.report(settings, self.train(settings, self.planned(settings)))

    def train(self, settings: ExperimentSettings, runs: list[RunSpec]) -> list[RunSpec]:
        """Train ``runs`` here, then plan again with their results and train what that adds (the comparison's
        held-out runs once their LR sweep is done, the tuning's next stage, or a point beyond an axis' edge, even in
        its last stage), until a plan adds nothing to train. Returns that plan."""
        while True:
            run_local(runs, settings.nproc, settings.threads, settings.parallel)
            runs = self.planned(settings)
            # Nothing more became ready (an LR on the grid's edge, say, or everything done): the report says why.
            if not any(not r.waiting_for and run_status(r) == PENDING for r in runs):
                return runs

    def planned(self, settings: ExperimentSettings) -> list[RunSpec]:
        """The plan's runs; the seeds of one config are composed once."""
        with composed_once():
            return self.plan(settings)

    def compose(self, argv: list[str]) -> tuple[ExperimentSettings, list[RunSpec]]:
        register_configs()  # an experiment's config may pick a model preset (abm's model=tiny), as the trainer's does
        settings = compose_schema(self.name, self.settings, self.overrides(argv))
        return settings, self.planned(settings)  # a run's config error is a config error too: before any work

    def main(self, argv: list[str] | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)

        def work(planned: tuple[ExperimentSettings, list[RunSpec]], flags: list[str]) -> None:
            settings, runs = planned
            if flags:  # --estimate
                print(estimate(runs, settings.nproc or 1, ASSUMED_MFU))
                if self.estimate_note:
                    print(self.estimate_note(settings))
                return
            if settings.report is ReportMode.after:
                create_out_dir(settings.out_dir)
                if settings.launcher is Launcher.slurm:
                    report = python_command(
                        f"lrm_train.experiments.{self.name}", [*argv, "report=only", "launcher=local"]
                    )
                    submit_slurm(runs, settings.slurm, report)
                    return
                runs = self.train(settings, runs)
            print(f"report: {self.report(settings, runs)}")

        return run_command(argv, self.usage(), self.compose, work, flags=("--estimate",), again=AGAIN)

    def usage(self) -> str:
        keys = ", ".join(f.name for f in dataclasses.fields(self.settings))
        return (
            f"{self.doc.strip()}\n\nusage: python -m lrm_train.experiments.{self.name} [experiment=NAME] "
            f"[key=value ...] [--estimate]\nkeys ({self.settings.__name__}; configs/{self.name}.yaml and "
            f"configs/experiment/{self.name}_*.yaml fill them in): {keys}\n"
            "--estimate prints the GPU hours of the plan and exits; report=only rebuilds the report from the finished "
            "runs;\nlauncher=slurm submits one job per unfinished run and the report after them; a rerun goes on."
        )


def finished(runs: list[RunSpec]) -> list[RunSpec]:
    """``runs``, each finished; otherwise one line naming the first that is not (``report=only`` before the end)."""
    for run in runs:
        if (status := run_status(run)) != FINISHED:
            raise ValueError(f"run {run.name} is {status}: the report needs every run finished ({run.run_dir})")
    return runs


def tokens_per_run(run: RunSpec, world_size: int) -> int:
    """Training tokens of one run, batch ramp included (the trainer's micro-batch count at each step)."""
    t = run.cfg.train
    steps = sum(micro_batches(run.cfg.schedule, t.grad_accum, step) for step in range(t.max_steps))
    return steps * t.micro_batch_size * world_size * run.cfg.data.seq_len


def estimate(runs: list[RunSpec], world_size: int, mfu: float) -> str:
    """GPU hours of the plan from each run's training FLOPs per token at an assumed MFU."""
    if not runs:
        return "0 runs: nothing to train"
    waiting = sum(bool(r.waiting_for) for r in runs)
    hours, tokens = [], []
    flops: dict[str, float] = {}  # per token, by model and length: the seeds of one model are built once
    for run in runs:
        shape = repr((run.cfg.model, run.cfg.lrm, run.cfg.data.seq_len))
        if shape not in flops:
            with torch.device("meta"):  # the FLOPs need the shapes only
                flops[shape] = FalconH1LM(run.cfg.model, run.cfg.lrm).flops_per_token(run.cfg.data.seq_len)
        tokens.append(tokens_per_run(run, world_size))
        peak = run.cfg.logging.peak_tflops * 1e12
        hours.append(flops[shape] * tokens[-1] / (mfu * peak) / 3600)
    peak_tflops = runs[0].cfg.logging.peak_tflops
    return (
        f"{len(runs)} runs"
        + (f" ({waiting} of them waiting for the runs they depend on, counted as planned)" if waiting else "")
        + f" x {max(tokens) / 1e9:.3g} GT at most ({world_size} processes per run): "
        f"{max(hours):,.0f} GPU hours for the largest run, {sum(hours):,.0f} in all, assuming {mfu:.0%} MFU of "
        f"{peak_tflops:g} TFLOP/s per GPU (logging.peak_tflops)"
    )
