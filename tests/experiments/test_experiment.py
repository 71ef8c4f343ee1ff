"""Every experiment has the same shape (settings, plan, report) and so the same command: --estimate, report=only,
launcher=slurm and the exit statuses are the comparison's for each analysis too."""

import os
import stat
import subprocess
import sys

import pytest

from lrm_train.experiments import (
    abm,
    clip_exclusion,
    compare,
    coord_check,
    norm_sweep,
    symmetry_drift,
    transfer,
    tune,
    width_scaling,
)
from lrm_train.experiments.experiment import Experiment, ExperimentSettings
from tests.experiments.micro_analysis import micro_trainer

EXPERIMENTS = [
    compare.COMPARE,
    abm.ABM,
    norm_sweep.NORM_SWEEP,
    width_scaling.WIDTH_SCALING,
    coord_check.COORD_CHECK,
    transfer.TRANSFER,
    clip_exclusion.CLIP_EXCLUSION,
    symmetry_drift.SYMMETRY_DRIFT,
    tune.TUNE,
]
MODULES = (compare, abm, norm_sweep, width_scaling, coord_check, transfer, clip_exclusion, symmetry_drift, tune)


def hydra_list(values: list[str]) -> str:
    return "[" + ",".join(f"'{v}'" for v in values) + "]"


def sweep_args(data_root, out_dir) -> list[str]:
    """A two-run norm sweep of micro runs."""
    return [
        f"out_dir={out_dir}",
        "scales=[0.5,2.0]",
        "~arms.scalar",
        "~arms.vector",
        "~end_seeds.frozen",
        "~end_seeds.scalar",
        "force=true",  # two-step runs: far too short for the pre-flight
        f"trainer={hydra_list(micro_trainer(data_root))}",
    ]


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda e: e.name)
def test_every_experiment_is_settings_a_plan_and_a_report_behind_one_command(experiment):
    assert isinstance(experiment, Experiment) and issubclass(experiment.settings, ExperimentSettings)
    module = {e.name: m for e, m in zip(EXPERIMENTS, MODULES)}
    assert module[experiment.name].main == experiment.main
    usage = experiment.usage()
    assert f"python -m lrm_train.experiments.{experiment.name}" in usage and "--estimate" in usage
    assert all(key in usage for key in ("out_dir", "launcher", "nproc", "slurm", "report"))


def test_an_analysis_estimates_its_cost_and_writes_nothing(data_root, tmp_path, capsys):
    assert norm_sweep.main([*sweep_args(data_root, tmp_path / "out"), "--estimate"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("2 runs x ") and "GPU hours" in printed and "assuming 35% MFU" in printed
    assert not (tmp_path / "out").exists()


def test_an_analysis_reports_only_from_finished_runs_and_says_which_is_not(data_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert norm_sweep.main([*sweep_args(data_root, out), "report=only"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert (
        line
        == f"error: run norm_sweep_frozen_S0.5 is pending: the report needs every run finished ({out}/runs/frozen_S0.5)"
    )
    assert norm_sweep.main(sweep_args(data_root, out)) == 0  # trains both, then reports
    report = (out / "report.md").read_bytes()
    (out / "report.md").unlink()
    assert norm_sweep.main([*sweep_args(data_root, out), "report=only"]) == 0  # the same report, from the runs alone
    assert (out / "report.md").read_bytes() == report


def test_an_analysis_submits_its_runs_and_its_report_to_slurm(data_root, tmp_path, monkeypatch):
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch.log"
    bin_dir.mkdir()
    for name, body in {"sbatch": f'echo "$@" >> {log}; echo $(( $(wc -l < {log}) + 100 ))', "squeue": "true"}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    args = [*sweep_args(data_root, tmp_path / "out"), "launcher=slurm"]
    assert norm_sweep.main(args) == 0
    runs, report = log.read_text().splitlines()[:2], log.read_text().splitlines()[2]
    assert [line.split()[1] for line in runs] == [
        "--job-name=norm_sweep_frozen_S0.5",
        "--job-name=norm_sweep_frozen_S2",
    ]
    assert report.startswith("--parsable --dependency=afterany:101:102 --job-name=report")
    assert "-m lrm_train.experiments.norm_sweep" in report and "report=only launcher=local" in report


@pytest.mark.multiprocess
@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda e: e.name)
def test_every_experiment_composes_in_a_fresh_process(experiment, tmp_path):
    # In a fresh interpreter nothing else has registered the model presets that an experiment's config may pick.
    # (compare_cpu runs its tuned arms with tune_cpu's output, which a fresh checkout does not have.)
    untuned = ["tuned_config=null"] if experiment is compare.COMPARE else []
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            f"lrm_train.experiments.{experiment.name}",
            f"out_dir={tmp_path}",
            *untuned,
            "--estimate",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
