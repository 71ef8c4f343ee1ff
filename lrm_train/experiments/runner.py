"""Runs an experiment's trainer runs, each in its own run directory, and knows which of them have finished.

A run is a list of trainer overrides (``RunSpec``); every run is composed by the trainer's ``compose`` before any
work, so a bad key in any of them stops the experiment with one line before the first step. Where a run stands is
read from its run directory alone, so it is the same whoever trained it (this process, torchrun, a Slurm job):

- ``finished``: its newest complete checkpoint is at ``train.max_steps`` (the trainer always saves the final step,
  after writing its metrics);
- ``diverged``: the trainer stopped on non-finite steps and left an ``emergency_step_*`` checkpoint; rerunning would
  diverge again from the same checkpoint, so it is kept as a result (delete the run directory to try again);
- ``pending``: anything else; training it resumes from its newest checkpoint (``train.resume=auto``).

Launchers: ``local`` trains the runs on this machine - one after another in this process on a CPU or one GPU, under
``torchrun --nproc_per_node=N ... dist=ddp`` on N GPUs, or ``parallel`` at once, each in its own spawned process -
with ``threads`` torch threads per process (1 by default: deterministic per machine); ``slurm`` submits one
``sbatch launch/slurm.sbatch`` job per run that is neither finished nor already queued. A run that waits for others
(``RunSpec.waiting_for``) is neither trained nor submitted: the experiment plans again once those have finished.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lrm_train.cli import CommandEnding
from lrm_train.train import RunConfig, compose, train
from lrm_train.train.checkpoint import checkpoint_root, complete_checkpoints
from lrm_train.train.preemption import STOP_SIGNALS, Stopped, StopSignals

FINISHED, DIVERGED, PENDING = "finished", "diverged", "pending"
SLURM_JOB_FILE = "slurm_job_id"  # in a run directory: the job that trains it


@dataclass
class RunSpec:
    name: str
    overrides: list[str]  # trainer overrides, train.run_dir included
    cfg: RunConfig
    labels: dict = field(default_factory=dict)  # what the experiment varies in this run (arm, lr, seed, ...)
    # Why the run cannot train yet (its config depends on runs not finished: the comparison's held-out runs take the
    # LR their sweep selects); empty when it can. A waiting run is composed with a stand-in so that its config is
    # checked and counted by --estimate, but it is never trained, submitted or read as a result.
    waiting_for: str = ""

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.run_dir)


def make_run(
    name: str, run_dir: Path, overrides: list[str], waiting_for: str = "", *, seed: int = 0, **labels
) -> RunSpec:
    """A run composed now (so a config error surfaces before any training), named ``name`` in W&B and logs, trained
    with ``train.seed=seed`` (also one of its labels); its own seed, folder and name override any in ``overrides``."""
    identity = {"train.seed": seed, "train.run_dir": str(run_dir), "experiment.name": name}
    try:
        cfg = _compose_run(overrides, identity)
    except ValueError as e:
        raise ValueError(f"run {name}: {e}") from None
    return RunSpec(name, [*overrides, *_as_overrides(identity)], cfg, {**labels, "seed": seed}, waiting_for)


# Within a ``composed_once`` block: the configs composed so far, by their overrides less the run's identity.
_composed: dict[tuple[str, ...], RunConfig] | None = None


@contextmanager
def composed_once() -> Iterator[None]:
    """Within it, runs whose overrides differ only in seed, folder and name are composed by Hydra once and copied
    (an 18-seed coordinate check's 576 runs plan in seconds, not minutes). One plan at a time: the files its configs
    read (a tuned baseline) may change between plans, never while one is made."""
    global _composed
    _composed = {}
    try:
        yield
    finally:
        _composed = None


def _compose_run(overrides: list[str], identity: dict) -> RunConfig:
    # An interpolation in an override may read the seed, folder or name: such a run is composed on its own.
    if _composed is None or any("${" in o for o in overrides):
        return compose([*overrides, *_as_overrides(identity)])
    key = tuple(overrides)
    if key not in _composed:
        cfg = compose([*overrides, *_as_overrides(identity)])
        _composed[key] = copy.deepcopy(cfg)
        return cfg
    cfg = copy.deepcopy(_composed[key])
    for dotted, value in identity.items():
        section, field_name = dotted.split(".")
        setattr(getattr(cfg, section), field_name, value)
    return cfg


def _as_overrides(values: dict) -> list[str]:
    return [f"{key}={value}" for key, value in values.items()]


def create_out_dir(out_dir: str | Path) -> Path:
    """An experiment's output folder, made once its settings and runs are checked and before any work, so that one
    that cannot be written (a read-only mount, a file in the way) is one line naming ``out_dir`` rather than a
    failure in the middle of the work."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out_dir={out_dir}: cannot create it ({e.strerror or e})") from None
    if not os.access(path, os.W_OK):  # an existing folder on a read-only mount (also for root)
        raise ValueError(f"out_dir={out_dir}: cannot write there")
    return path


def run_status(run: RunSpec) -> str:
    if any(p.name.startswith("emergency_step_") for p in _children(checkpoint_root(run.run_dir))):
        return DIVERGED
    done = complete_checkpoints(run.run_dir)
    if done and int(done[-1].name.removeprefix("step_")) >= run.cfg.train.max_steps:
        return FINISHED
    return PENDING


def _children(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() else []


def run_local(runs: list[RunSpec], nproc: int = 0, threads: int = 1, parallel: int = 1) -> None:
    """Train every unfinished run that is not waiting for others: one after another, or ``parallel`` at once, each
    in its own process; ``nproc`` processes per run (0: one per visible GPU, at least one), each with ``threads``
    torch threads (0: torch's default, every core)."""
    nproc = nproc or max(1, torch.cuda.device_count())
    todo = []
    for i, run in enumerate(runs, 1):
        status = run_status(run)
        if run.waiting_for:
            print(f"[{i}/{len(runs)}] {run.name}: waits for {run.waiting_for}", flush=True)
        elif status != PENDING:
            print(f"[{i}/{len(runs)}] {run.name}: {status}, skipped", flush=True)
        else:
            todo.append((i, run))
    if parallel > 1:
        _train_in_parallel(todo, len(runs), threads, parallel)
        return
    if nproc == 1:
        _train_in_sequence(todo, len(runs), threads)
        return
    for i, run in todo:
        print(f"[{i}/{len(runs)}] {run.name}: training", flush=True)
        _train_with_torchrun(run, nproc, threads)
        print(f"[{i}/{len(runs)}] {run.name}: {run_status(run)}", flush=True)


def _train_in_sequence(todo: list[tuple[int, RunSpec]], total: int, threads: int) -> None:
    """The runs one after another in this process. A stop signal is recorded for the whole sequence, not only while
    a run's loop steps: one that lands in a run's last step (the run finishes it and saves) or while a run starts
    stops the sequence there rather than being lost, and one between runs no longer kills a run half set up."""
    with StopSignals() as stop:
        for i, run in todo:
            if stop.received:
                break
            print(f"[{i}/{total}] {run.name}: training", flush=True)
            with torch_threads(threads):
                _train_in_process(run)
            print(f"[{i}/{total}] {run.name}: {run_status(run)}", flush=True)
    if stop.received:
        name = signal.Signals(stop.received).name
        raise Stopped(f"{name} between runs (every run begun has finished)", stop.received)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """``threads`` torch threads inside (0: unchanged). One thread makes a run's float sums the same on every
    machine with the same CPU instructions, whatever its core count or load; several threads split the reductions
    differently from one machine to the next (a seed re-run with 1 thread instead of 2 moved a final loss by 0.024)."""
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_in_process(run: RunSpec) -> None:
    # In process, not a subprocess: one run costs no interpreter and torch start-up, and a config or disk error
    # keeps its own one-line message. The trainer reseeds everything it uses from the run's config.
    try:
        train(run.cfg)
    except RuntimeError as e:
        if run_status(run) != DIVERGED:  # only non-finite steps leave an emergency checkpoint
            raise
        print(f"  {run.name}: {e}", flush=True)


class EndedInWorker(CommandEnding):
    """A run's ending (a stop on a signal, an interruption) raised in a parallel worker, carried to this process with
    its line and exit status (the trainer's endings take arguments that pickling cannot rebuild)."""

    def __init__(self, message: str, exit_code: int, word: str) -> None:
        super().__init__(message, exit_code, word)
        self.exit_code, self.word = exit_code, word

    def __str__(self) -> str:
        return self.args[0]


def _train_spawned(run: RunSpec, threads: int) -> EndedInWorker | None:
    """A parallel worker's run: trained as in this process, its ending returned rather than raised."""
    try:
        with torch_threads(threads):
            _train_in_process(run)
    except CommandEnding as e:
        return EndedInWorker(str(e), e.exit_code, e.word)
    return None


@contextmanager
def _started_ignoring_stop_signals() -> Iterator[None]:
    """While entered, the processes this one starts are born ignoring stop signals (an ignored signal stays ignored
    across exec), and a stop signal sent to this process is held until the exit, not lost. A worker must ignore them
    outside a run's training loop (while it starts, a run starts, between runs) so that it always ends through its
    trainer, which records the signal while it loops, saves and returns its ending, and never leaves the pool broken
    with a run half-saved; a worker killed by a signal forwarded while it was still starting did just that."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _unblock_stop_signals() -> None:
    """A parallel worker's start: it was born with the stop signals ignored and blocked; unblocked, they stay ignored
    until a run's trainer takes them."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class _ForwardStopSignals(StopSignals):
    """While entered: a stop signal (SIGTERM, SIGUSR1) sent to this process alone - by ``kill``, ``timeout`` or a
    supervisor; Ctrl-C and Slurm reach every process themselves - is recorded and passed on to the workers, again
    every ``poll()`` until they end, so that a worker that was between runs gets it once its trainer loops. A second
    signal kills the workers and then this process, as it would have without us."""

    def _record(self, signum: int, _frame) -> None:
        if self.received:
            for worker in multiprocessing.active_children():
                worker.kill()
            self._restore()
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        self.poll()

    def poll(self) -> None:
        if self.received:
            for worker in multiprocessing.active_children():
                os.kill(worker.pid, self.received)


def _train_in_parallel(todo: list[tuple[int, RunSpec]], total: int, threads: int, parallel: int) -> None:
    # Spawned, not forked: a forked child inherits this process's torch thread pools and state, which is unsafe;
    # a spawned one starts clean and trains exactly as a sequential run with the same thread count does.
    spawn = multiprocessing.get_context("spawn")
    endings: list[EndedInWorker] = []
    with (
        _ForwardStopSignals() as stop,
        ProcessPoolExecutor(parallel, mp_context=spawn, initializer=_unblock_stop_signals) as pool,
    ):
        futures = {}
        with _started_ignoring_stop_signals():  # the workers start with the first submissions
            for i, run in todo:
                print(f"[{i}/{total}] {run.name}: training (up to {parallel} at once)", flush=True)
                futures[pool.submit(_train_spawned, run, threads)] = (i, run)
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                for future in done:
                    if future.cancelled():
                        continue
                    i, run = futures[future]
                    if ended := future.result():
                        endings.append(ended)
                    print(f"[{i}/{total}] {run.name}: {run_status(run)}", flush=True)
                if endings or stop.received:  # the runs not started stay pending; those in progress save
                    for future in pending:
                        future.cancel()
                stop.poll()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    if endings:
        raise endings[0]
    if stop.received:
        raise Stopped(f"{signal.Signals(stop.received).name} with no run in progress", stop.received)


def _train_with_torchrun(run: RunSpec, nproc: int, threads: int) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "-m",
        "lrm_train.train",
        "dist=ddp",
        *run.overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    done = subprocess.run(command, env=env)
    if done.returncode == 130:
        raise KeyboardInterrupt
    if done.returncode != 0 and run_status(run) != DIVERGED:
        raise RuntimeError(f"run {run.name} failed (exit status {done.returncode}); see {run.run_dir}")


@dataclass
class SlurmConfig:
    script: str = "launch/slurm.sbatch"  # one torchrun per node, requeue-friendly
    nodes: int = 1  # per run
    sbatch_args: list[str] = field(default_factory=list)  # e.g. ["--partition=gpu", "--time=2-00:00:00"]

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"slurm.nodes={self.nodes} must be >= 1")


def submit_slurm(runs: list[RunSpec], slurm: SlurmConfig, report_command: list[str] | None = None) -> list[str]:
    """One ``sbatch`` job per run that is neither finished, diverged nor still queued; then, if ``report_command`` is
    given, a job that runs it once all of them have ended (``--dependency=afterany``). Returns the job ids."""
    job_ids = []
    for run in runs:
        if run.waiting_for:
            print(f"{run.name}: waits for {run.waiting_for}, not submitted (run the same command again after it)")
            continue
        status = run_status(run)
        queued = _queued_job(run)
        if status != PENDING or queued:
            print(f"{run.name}: {status if status != PENDING else f'queued as job {queued}'}, not submitted")
            continue
        run.run_dir.mkdir(parents=True, exist_ok=True)
        job_id = _sbatch(
            [
                f"--job-name={run.name}",
                f"--nodes={slurm.nodes}",
                f"--output={run.run_dir}/slurm-%j.out",
                *slurm.sbatch_args,
                slurm.script,
                *run.overrides,
            ]
        )
        (run.run_dir / SLURM_JOB_FILE).write_text(job_id)
        print(f"{run.name}: submitted as job {job_id}")
        job_ids.append(job_id)
    if report_command and job_ids:
        job_id = _sbatch(
            [
                f"--dependency=afterany:{':'.join(job_ids)}",
                "--job-name=report",
                *slurm.sbatch_args,
                f"--wrap={shlex.join(report_command)}",
            ]
        )
        print(f"report: job {job_id}, after the runs end")
        job_ids.append(job_id)
    return job_ids


def _sbatch(args: list[str]) -> str:
    done = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sbatch failed (exit status {done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"


def _queued_job(run: RunSpec) -> str | None:
    """The job id recorded for this run if Slurm still lists it (pending or running)."""
    id_file = run.run_dir / SLURM_JOB_FILE
    if not id_file.is_file():
        return None
    job_id = id_file.read_text().strip()
    listed = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return job_id if listed.returncode == 0 and listed.stdout.strip() else None


def python_command(module: str, args: list[str]) -> list[str]:
    """``python -m module args`` with this interpreter (for jobs that run on this installation)."""
    return [sys.executable, "-m", module, *args]
