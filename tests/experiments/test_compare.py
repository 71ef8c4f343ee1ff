"""The LRM-vs-muP comparison on the micro model: the two phases, skip and resume, the report and its statistics
(paired gap, verdicts, trend), the edge rule, parallel runs, Slurm."""

import json
import math
import os
import shutil
import stat

import matplotlib.image
import pytest
from runs import COMPARE_TWO_ARMS, overrides

from lrm_train.config_compose import compose_schema
from lrm_train.experiments.compare import (
    COMPARE,
    HELD_OUT,
    SELECTION,
    CompareConfig,
    arm_overrides,
    equilibration,
    equilibration_words,
    lr_grid,
    main,
    plan,
    selections,
    summarize,
)
from lrm_train.experiments.experiment import tokens_per_run
from lrm_train.experiments.results import RunResult, gap_trend, paired_gap, read_metrics
from lrm_train.experiments.runner import FINISHED, PENDING, RunSpec, make_run, run_local, run_status
from lrm_train.models import static_transplant
from lrm_train.optim import ScheduleName
from lrm_train.train.checkpoint import complete_checkpoints, model_from_checkpoint

STEPS = 8


def hydra_list(values: list[str]) -> str:
    return "[" + ",".join(json.dumps(v) for v in values) + "]"


def micro_args(data_root, out_dir, **extra) -> list[str]:
    """A comparison under AdamW on the micro model: a sweep of 2 arms x 2 LRs on seed 0 (a grid of two has no
    inside, hence allow_edge), then each arm at its selected LR on held-out seeds 1 and 2: 8 runs of 8 steps,
    validated every 2 steps (3 evaluations in the constant phase, steps 2 to 7), final loss over the last 2."""
    train = {k: v for k, v in overrides(data_root, "unused").items() if k != "train.run_dir"}
    train.update({"train.max_steps": STEPS, "train.eval_every": 2, "train.log_every": 2, "schedule.warmup_steps": 2})
    args = {
        "out_dir": str(out_dir),
        "name": "micro",
        "train": hydra_list([f"{k}={v}" for k, v in train.items()]),
        "lr_center.adamw": 0.01,
        "lr_center.muon": 0.01,
        "optimizers": "[adamw]",
        "lr_points": 2,
        "selection_seeds": "[0]",
        "seeds": "[1,2]",
        "final_evals": 2,
        "allow_edge": "true",
        "parallel": 1,  # in this process (compare_cpu trains two at once)
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()] + COMPARE_TWO_ARMS


def val_losses(run_dir) -> list[float]:
    return [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r]


def is_png_with_content(path) -> bool:
    image = matplotlib.image.imread(path)
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 100 and image.std() > 0.01


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    assert main(micro_args(data_root, out)) == 0
    return out


def test_the_sweep_runs_on_the_selection_seeds_and_the_held_out_runs_at_the_selected_lr(data_root, finished):
    cfg = compose_schema("compare", CompareConfig, micro_args(data_root, finished))
    runs = plan(cfg)
    sweep = [r for r in runs if r.labels["phase"] == SELECTION]
    held_out = [r for r in runs if r.labels["phase"] == HELD_OUT]
    assert len(sweep) == 2 * 2 and len(held_out) == 2 * 2 and not any(r.waiting_for for r in runs)
    assert {r.labels["seed"] for r in sweep} == {0} and {r.labels["seed"] for r in held_out} == {1, 2}
    assert sorted(p.name for p in (finished / "runs").iterdir()) == sorted(r.name for r in runs)
    for run in runs:
        assert run_status(run) == FINISHED
        assert [r["step"] for r in read_metrics(run.run_dir)] == list(range(2, STEPS + 1, 2))
        # the sweep validates only where its final loss is read; the held-out runs all along, for the gap's trend
        validated = [r["step"] for r in read_metrics(run.run_dir) if "val_loss" in r]
        assert validated == ([6, 8] if run.labels["phase"] == SELECTION else [2, 4, 6, 8])
        assert run.cfg.logging.wandb.group == "micro" and run.cfg.train.seed == run.labels["seed"]
        assert run.cfg.optim.lr == run.labels["lr"] and f"-lr{run.labels['lr']:.3g}-s{run.labels['seed']}" in run.name
    lrs = sorted({r.cfg.optim.lr for r in sweep})
    assert lrs == pytest.approx(lr_grid(0.01, 2)) and lrs[1] / lrs[0] == pytest.approx(2**0.5)
    for arm in ("mup", "lrm"):
        finals = {r.labels["lr"]: sum(val_losses(r.run_dir)[-2:]) / 2 for r in sweep if r.labels["arm"] == arm}
        assert {r.cfg.optim.lr for r in held_out if r.labels["arm"] == arm} == {min(finals, key=finals.get)}


def test_before_the_sweep_finishes_the_held_out_runs_wait_and_are_counted(data_root, tmp_path, capsys):
    cfg = compose_schema("compare", CompareConfig, micro_args(data_root, tmp_path / "out", seeds="[1,2,3]"))
    runs = plan(cfg)
    waiting = [r for r in runs if r.waiting_for]
    assert [r.labels["phase"] for r in waiting] == [HELD_OUT] * 6 and len(runs) == 4 + 6
    assert {r.labels["seed"] for r in waiting} == {1, 2, 3} and all(r.labels["lr"] is None for r in waiting)
    assert all("the LR sweep of mup, lrm (adamw) on seeds [0]" == r.waiting_for for r in waiting)
    assert main([*micro_args(data_root, tmp_path / "out", seeds="[1,2,3]"), "--estimate"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("10 runs (6 of them waiting") and "assuming 35% MFU" in printed
    assert not (tmp_path / "out").exists()


def test_a_held_out_seed_that_selected_the_lr_is_refused(data_root, tmp_path, capsys):
    assert main(micro_args(data_root, tmp_path / "out", seeds="[2,0]")) == 2
    assert capsys.readouterr().err.strip() == (
        "error: config: seeds=[2, 0] holds the selection seed 0: the held-out seeds must not be ones the LR was "
        "selected on"
    )
    assert not (tmp_path / "out").exists()


def test_report_numbers_equal_the_runs_metrics(finished):
    report = json.loads((finished / "report.json").read_text())
    text = (finished / "report.md").read_text()
    runs = {(r["arm"], r["lr"], r["seed"]): r["run_dir"] for r in report["runs"]}
    rows = {(r["arm"], r["optimizer"]): r for r in report["rows"]}
    assert set(rows) == {("mup", "adamw"), ("lrm", "adamw")}
    final = {key: sum(val_losses(run_dir)[-2:]) / 2 for key, run_dir in runs.items()}  # final_evals=2
    for (arm, _), row in rows.items():
        by_lr = {p["lr"]: p["mean"] for p in row["lr_curve"]}
        assert by_lr == {lr: final[(arm, lr, 0)] for lr in lr_grid(0.01, 2)}
        assert row["selected_lr"] == min(by_lr, key=by_lr.get) and row["at_grid_edge"]  # 2 LRs: no inside
        assert row["held_out"]["seeds"] == [1, 2]
        assert row["held_out"]["finals"] == [final[(arm, row["selected_lr"], s)] for s in (1, 2)]
    (gap,) = report["gaps"]
    assert (gap["arm"], gap["reference"], gap["optimizer"]) == ("lrm", "mup", "adamw")
    per_seed = [
        final[("lrm", rows[("lrm", "adamw")]["selected_lr"], s)]
        - final[("mup", rows[("mup", "adamw")]["selected_lr"], s)]
        for s in (1, 2)
    ]
    assert gap["per_seed"] == pytest.approx(per_seed)
    mean, half = sum(per_seed) / 2, 12.706 * abs(per_seed[0] - per_seed[1]) / 2  # t(1 df) x sd / sqrt(2)
    assert gap["mean"] == pytest.approx(mean) and gap["ci95"] == pytest.approx([mean - half, mean + half])
    assert f"final gap {mean:+.4f}, 95% CI [{mean - half:+.4f}, {mean + half:+.4f}]: **{gap['verdict']}**" in text
    assert gap["trend"]["points"] == 3 and gap["trend"]["trend"] in ("growing", "flat", "shrinking", "crossing")
    assert gap["curve"]["seeds"] == [1, 2] and gap["curve"]["mean"][-1] == pytest.approx(
        sum(
            val_losses(runs[("lrm", rows[("lrm", "adamw")]["selected_lr"], s)])[-1]
            - val_losses(runs[("mup", rows[("mup", "adamw")]["selected_lr"], s)])[-1]
            for s in (1, 2)
        )
        / 2
    )
    assert "**WARNING: selected LR on the edge of the grid" in text and "allow_edge=true" in text
    moved = rows[("lrm", "adamw")]["multipliers_moved_most"]
    assert len(moved) == 5 and "multipliers_moved_most" not in rows[("mup", "adamw")]
    records = read_metrics(rows[("lrm", "adamw")]["held_out"]["run_dirs"][0])
    for name, ratio in moved.items():
        values = [r[f"lrm/{name}"] for r in records if f"lrm/{name}" in r]
        assert ratio == pytest.approx(values[-1] / values[0]) and f"`{name}` x{ratio:.3g}" in text


def test_plots_are_non_empty_images(finished):
    report = json.loads((finished / "report.json").read_text())
    assert set(report["figures"]) == {"val_loss", "gap", "lr_sensitivity", "multipliers", "norms_abm"}
    for name in report["figures"].values():
        assert is_png_with_content(finished / name), name
        assert f"]({name})" in (finished / "report.md").read_text()


def test_a_selected_lr_on_the_grid_edge_stops_the_comparison_before_its_held_out_phase(
    data_root, finished, tmp_path, capsys
):
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    args = micro_args(data_root, out, allow_edge="false")
    runs = plan(compose_schema("compare", CompareConfig, args))
    waiting = [r for r in runs if r.waiting_for]
    assert (
        len(waiting) == 4
        and "an interior best LR: that of mup, lrm (adamw) is on the grid's edge" in waiting[0].waiting_for
    )
    capsys.readouterr()
    assert main(args) == 1  # nothing trains (the held-out runs wait), and the report says why
    captured = capsys.readouterr()
    assert "training" not in captured.out and captured.err.startswith(
        "error: selected LR on the grid's edge for mup (adamw), lrm (adamw)"
    )
    report = json.loads((out / "report.json").read_text())
    assert all(row["held_out"]["seeds"] == [] for row in report["rows"]) and report["gaps"] == []
    assert "the held-out phase of that optimizer did not run" in (out / "report.md").read_text()


def _result(arm, lr, seed, final, phase=SELECTION, gaps=None):
    """A finished run's result as the summary reads it (validations at 100, 200, 300 tokens)."""
    run = RunSpec(f"{arm}{lr}{seed}", [], _FakeRun(), dict(arm=arm, optimizer="adamw", lr=lr, seed=seed, phase=phase))
    val = gaps or [final, final, final]
    records = [dict(step=50 * i, tokens_seen=100 * i) for i in (1, 2, 3)]
    return RunResult(run, FINISHED, final, [100, 200, 300], val, records)


class _FakeRun:
    """The parts of a RunConfig the summary reads."""

    class schedule:
        name, decay_fraction, warmup_steps = ScheduleName.constant_exp_decay, 0.5, 0

    class train:
        max_steps, run_dir = 150, "nowhere"


def test_the_selected_lr_is_the_sweeps_lowest_and_only_an_interior_one_is_not_an_edge():
    cfg = CompareConfig(arms={"mup": ["lrm=none"], "lrm": ["lrm=full"]}, lr_center={"adamw": 0.01, "muon": 0.01})
    cfg.optimizers, cfg.lr_points = ["adamw"], 3
    low, mid, high = lr_grid(0.01, 3)
    results = [_result("mup", lr, 0, f) for lr, f in ((low, 3.2), (mid, 3.1), (high, 3.15))]
    results += [_result("lrm", lr, 0, f) for lr, f in ((low, 3.2), (mid, 3.1), (high, 3.0))]
    chosen = selections(cfg, results)
    assert chosen[("mup", "adamw")] == dict(lr=mid, finished=True, edge=False)
    assert chosen[("lrm", "adamw")] == dict(lr=high, finished=True, edge=True)
    chosen = selections(cfg, results[:-1])  # lrm's top LR not finished: nothing selected yet
    assert chosen[("lrm", "adamw")] == dict(lr=None, finished=False, edge=False)


@pytest.mark.parametrize(
    "arm, base, mean, half, verdict",
    [
        # gaps -0.10, -0.12, -0.08: mean -0.10, sd 0.02, t(2 df) 4.303 -> half 4.303 x 0.02 / sqrt(3)
        ([2.90, 2.88, 2.92], [3.00, 3.00, 3.00], -0.10, 4.303 * 0.02 / math.sqrt(3), "LRM better"),
        # gaps +0.01, -0.02, +0.04: mean 0.01, sd 0.03
        ([3.01, 2.98, 3.04], [3.00, 3.00, 3.00], 0.01, 4.303 * 0.03 / math.sqrt(3), "no difference resolved"),
        # gaps +0.05, +0.07 (2 seeds): mean 0.06, sd 0.01414, t(1 df) 12.706 -> half 12.706 x 0.01 = 0.127: holds 0
        ([3.05, 3.07], [3.00, 3.00], 0.06, 12.706 * 0.01, "no difference resolved"),
        # gaps +0.05, +0.06, +0.07, +0.06: mean 0.06, sd 0.008165, t(3 df) 3.182
        ([3.05, 3.06, 3.07, 3.06], [3.0] * 4, 0.06, 3.182 * 0.008165 / 2, "baseline better"),
    ],
)
def test_the_paired_gap_its_interval_and_verdict_match_hand_computed_values(arm, base, mean, half, verdict):
    gap = paired_gap(dict(enumerate(arm)), dict(enumerate(base)))
    assert gap["mean"] == pytest.approx(mean) and gap["ci95"] == pytest.approx([mean - half, mean + half], abs=1e-5)
    assert gap["verdict"] == verdict and gap["seeds"] == list(range(len(arm)))


def test_the_paired_gap_pairs_only_seeds_both_arms_finished():
    gap = paired_gap({1: 2.9, 2: None, 3: 2.8}, {1: 3.0, 2: 3.0, 3: 3.0, 4: 3.0})
    assert gap["seeds"] == [1, 3] and gap["per_seed"] == pytest.approx([-0.1, -0.2])
    one = paired_gap({1: 2.9}, {1: 3.0})
    assert one["mean"] == pytest.approx(-0.1) and one["ci95"] is None and one["verdict"] is None  # no interval
    assert paired_gap({1: None}, {1: 3.0}) is None


def _curve(per_seed, tokens):
    return dict(tokens=tokens, per_seed=per_seed, mean=[sum(c) / len(c) for c in zip(*per_seed)])


@pytest.mark.parametrize(
    "slope, level, trend",
    [
        (-1e-4, -0.1, "growing"),
        (1e-4, -0.1, "shrinking"),
        (1e-4, 0.2, "growing"),
        (-1e-4, 0.2, "shrinking"),
        (-5e-4, 0.05, "crossing"),  # +0.05 at the start, -0.15 at the end: the arm overtakes the baseline
        (5e-4, -0.05, "crossing"),
    ],
)
def test_the_trend_is_the_gaps_size_growing_or_shrinking_through_the_constant_phase(slope, level, trend):
    tokens = [100, 200, 300, 400, 500, 600]
    wiggle = [[0.001, -0.002, 0.001, 0.002, -0.001, 0.0], [-0.001, 0.001, 0.0, -0.002, 0.001, 0.001]]
    per_seed = [[level + slope * (t - 100) + w for t, w in zip(tokens, ws)] for ws in wiggle]
    per_seed.append([level + slope * (t - 100) for t in tokens])
    fit = gap_trend(_curve(per_seed, tokens), 100, 550)  # 600 is past the constant phase: not fitted
    assert fit["points"] == 5 and fit["last_tokens"] == 500 and fit["trend"] == trend
    assert fit["slope"] == pytest.approx(slope, rel=0.1) and fit["ci95"][0] < slope < fit["ci95"][1]


def test_a_gap_that_only_wobbles_is_flat_and_three_evaluations_are_needed():
    tokens = [100, 200, 300, 400]
    per_seed = [[-0.1, -0.11, -0.09, -0.1], [-0.1, -0.09, -0.11, -0.1], [-0.12, -0.1, -0.1, -0.12]]
    fit = gap_trend(_curve(per_seed, tokens), 0, 1000)
    assert fit["trend"] == "flat" and fit["ci95"][0] < 0 < fit["ci95"][1]
    assert fit["mean_gap"] == pytest.approx(-0.10333, abs=1e-4)
    assert gap_trend(_curve(per_seed, tokens), 150, 350) is None  # 2 evaluations: no trend
    one = gap_trend(_curve([[0.0, -0.1, -0.2, -0.3]], tokens), 0, 1000)  # one seed: the fit's own interval
    assert (
        one["slope"] == pytest.approx(-1e-3)
        and one["ci95"] == pytest.approx([-1e-3, -1e-3])
        and one["trend"] == "growing"
    )


def test_a_summary_pairs_the_held_out_seeds_and_fits_the_constant_phase_from_the_schedule():
    """The gap curve and its band from held-out results; the decay's start (step 75 of 150: 150 tokens) is read from
    the schedule, and with one validation before it there is no trend."""
    cfg = CompareConfig(arms={"mup": ["lrm=none"], "lrm": ["lrm=full"]}, lr_center={"adamw": 0.01, "muon": 0.01})
    cfg.optimizers, cfg.lr_points, cfg.allow_edge = ["adamw"], 1, True
    results = [_result("mup", 0.01, 0, 3.0), _result("lrm", 0.01, 0, 2.9)]
    for seed, (a, b) in {1: (2.90, 3.00), 2: (2.92, 3.00), 3: (2.88, 3.00)}.items():
        results.append(_result("mup", 0.01, seed, b, HELD_OUT, [b + 0.1, b + 0.05, b]))
        results.append(_result("lrm", 0.01, seed, a, HELD_OUT, [b + 0.05, a + 0.05, a]))
    summary = summarize(cfg, results)
    rows = {r["arm"]: r for r in summary["rows"]}
    (gap,) = summary["gaps"]
    assert gap["per_seed"] == pytest.approx([-0.10, -0.08, -0.12]) and gap["verdict"] == "LRM better"
    assert gap["curve"]["tokens"] == [100, 200, 300] and gap["curve"]["mean"] == pytest.approx([-0.05, -0.10, -0.10])
    assert gap["curve"]["ci95"][0] == pytest.approx([-0.05, -0.05])  # the same gap on every seed: no width
    assert gap["curve"]["ci95"][1] == pytest.approx([-0.10 - 4.303 * 0.02 / 3**0.5, -0.10 + 4.303 * 0.02 / 3**0.5])
    assert gap["decay_start_tokens"] == 150 and gap["trend"] is None  # 2 evaluations before the decay: no trend
    assert rows["mup"]["held_out"]["finals"] == [3.0, 3.0, 3.0] and rows["mup"]["selected_lr"] == 0.01


@pytest.mark.multiprocess
def test_parallel_runs_train_exactly_as_sequential_ones(data_root, tmp_path):
    """Two micro runs one after another in this process, then the same two side by side in two spawned processes:
    the same losses to the bit (each single-threaded)."""

    def two(folder):
        return [
            make_run(
                f"r{seed}",
                folder / f"r{seed}",
                [
                    f"{k}={v}"
                    for k, v in overrides(data_root, "x", **{"train.seed": seed}).items()
                    if k != "train.run_dir"
                ],
                seed=seed,
            )
            for seed in (0, 1)
        ]

    sequential, parallel = two(tmp_path / "seq"), two(tmp_path / "par")
    run_local(sequential, nproc=1, threads=1, parallel=1)
    run_local(parallel, nproc=1, threads=1, parallel=2)
    for a, b in zip(sequential, parallel):
        assert run_status(b) == FINISHED
        keys = ("loss", "val_loss", "grad_norm")
        assert [[r.get(k) for k in keys] for r in read_metrics(a.run_dir)] == [
            [r.get(k) for k in keys] for r in read_metrics(b.run_dir)
        ]
    assert val_losses(sequential[0].run_dir) != val_losses(sequential[1].run_dir)  # two seeds: two different runs


def test_rerun_skips_finished_runs_and_resumes_unfinished_ones(data_root, finished, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    runs = plan(compose_schema("compare", CompareConfig, micro_args(data_root, out)))
    cut, untouched = runs[-1], runs[:-1]  # a held-out run
    shutil.rmtree(cut.run_dir / "checkpoints" / f"step_{STEPS:08d}")  # as if killed after step 4's checkpoint
    assert run_status(cut) == PENDING
    before = {r.name: (r.run_dir / "metrics.jsonl").stat().st_mtime_ns for r in untouched}
    expected = val_losses(cut.run_dir)[-1]

    assert main(micro_args(data_root, out, report="only")) == 0  # from what has finished: 7 of 8
    report = json.loads((out / "report.json").read_text())
    assert cut.name not in {r["name"] for r in report["runs"]} and len(report["runs"]) == 7
    assert "7 of 8 runs finished" in (out / "report.md").read_text()

    capsys.readouterr()
    assert main(micro_args(data_root, out)) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished, skipped") == 7 and f"{cut.name}: training" in printed
    assert {r.name: (r.run_dir / "metrics.jsonl").stat().st_mtime_ns for r in untouched} == before
    assert "resumed from" in (cut.run_dir / "train_rank0.log").read_text()
    assert [r["step"] for r in read_metrics(cut.run_dir)] == list(range(2, STEPS + 1, 2))
    assert val_losses(cut.run_dir)[-1] == pytest.approx(expected, rel=1e-5)  # exact resume: the same loss
    assert len(json.loads((out / "report.json").read_text())["runs"]) == 8


def test_config_errors_are_one_line_before_any_run(data_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(micro_args(data_root, out, lr_pointz=3)) == 2
    assert main(micro_args(data_root, out, train=hydra_list(["train.max_stepz=3"]))) == 2
    assert main(micro_args(data_root, out, baseline="nope")) == 2
    assert main(micro_args(data_root, out, final_evals=5)) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(e.startswith("error: config: ") for e in errors)
    assert "lr_pointz" in errors[0] and "train.max_stepz" in errors[1] and "baseline='nope'" in errors[2]
    assert "final_evals=5: a run evaluates only 4 times" in errors[3]
    assert not out.exists()


def test_slurm_submits_one_job_per_unfinished_run_then_the_report(data_root, finished, tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    fake = {
        "sbatch": f'echo "$@" >> {log}; echo $(( $(wc -l < {log}) + 100 ))',
        "squeue": 'if [ "$3" = "101" ]; then echo PENDING; fi',  # job 101 is still queued, the others have ended
    }
    for name, body in fake.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    args = micro_args(data_root, out, optimizers="[adamw,muon]", lr_points=1, launcher="slurm")
    args.append(f"slurm.sbatch_args={hydra_list(['--partition=gpu'])}")
    shutil.rmtree(plan(compose_schema("compare", CompareConfig, args))[0].run_dir)  # a finished AdamW run gone
    runs = plan(compose_schema("compare", CompareConfig, args))  # the Muon runs never ran
    pending = [r for r in runs if not r.waiting_for and run_status(r) == PENDING]
    assert len(runs) == 4 + 8 and len(pending) == 3  # the 8 held-out runs wait for the sweep: not submitted

    assert main(args) == 0
    submitted = log.read_text().splitlines()
    assert len(submitted) == 4  # the unfinished runs, then the report
    for i, (run, line) in enumerate(zip(pending, submitted)):
        assert line.startswith(f"--parsable --job-name={run.name} --nodes=1 --output={run.run_dir}/slurm-%j.out")
        assert line.endswith(" ".join(["--partition=gpu launch/slurm.sbatch", *run.overrides]))
        assert (run.run_dir / "slurm_job_id").read_text() == str(101 + i)
    assert submitted[3].startswith("--parsable --dependency=afterany:101:102:103 --job-name=report")
    assert "report=only launcher=local" in submitted[3] and "--partition=gpu" in submitted[3]

    assert main(args) == 0  # 101 is still queued; the others ended without finishing: submitted again
    again = log.read_text().splitlines()[4:]
    assert [line.split()[1] for line in again[:2]] == [f"--job-name={r.name}" for r in pending[1:]]
    printed = capsys.readouterr().out
    assert "queued as job 101" in printed and printed.count("waits for the LR sweep of") == 2 * 8


def test_estimate_counts_the_tokens_of_the_batch_ramp(data_root, tmp_path, capsys):
    values = overrides(data_root, tmp_path / "run", **{"train.grad_accum": 2, "schedule.batch_ramp_steps": 4})
    values["schedule.batch_ramp_start"] = 0.5
    run = make_run("one", tmp_path / "run", [f"{k}={v}" for k, v in values.items() if k != "train.run_dir"])
    # micro-batches of 2 per step: 1, 2, 2, 2 during the ramp (0.5, 0.625, 0.75, 0.875 of the batch), then 4 x 2
    assert tokens_per_run(run, world_size=1) == 15 * 4 * 32
    assert tokens_per_run(run, world_size=8) == 8 * 15 * 4 * 32
    assert main([*micro_args(data_root, tmp_path / "out"), "--estimate"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("8 runs (4 of them waiting") and "assuming 35% MFU" in printed
    assert not (tmp_path / "out").exists()


@pytest.mark.multiprocess
def test_nproc_runs_each_run_under_torchrun_with_ddp(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    args = [*micro_args(data_root, out, lr_points=1, seeds="[1]", nproc=2), "~arms.lrm"]  # the baseline's 2 runs
    assert main(args) == 0
    run, held_out = plan(compose_schema("compare", CompareConfig, args))
    assert run_status(run) == run_status(held_out) == FINISHED and run.name.startswith("mup-adamw")
    assert (run.run_dir / "train_rank1.log").is_file()  # a second rank trained it
    assert "world size 2" in (run.run_dir / "train_rank0.log").read_text()


def test_downstream_scores_become_columns_of_the_table(data_root, finished, tmp_path, monkeypatch):
    from lrm_train.eval import api

    scored = []

    def fake_evaluate(path, tasks, limit, batch_size):
        scored.append(path)
        return {"tasks": {"hellaswag": {"acc": 0.25 + len(str(path)) % 7 / 100}}}

    monkeypatch.setattr(api, "evaluate_checkpoint", fake_evaluate)
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    args = micro_args(data_root, out, report="only", **{"downstream.tasks": "[hellaswag]", "downstream.limit": 10})
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(scored) == 4  # each arm's final checkpoints at its selected LR, one per held-out seed
    for row in report["rows"]:
        paths = [[p for p in scored if str(p).startswith(d)] for d in row["held_out"]["run_dirs"]]
        assert all(len(p) == 1 and p[0].name == f"step_{STEPS:08d}" for p in paths) and len(paths) == 2
        acc = [0.25 + len(str(p)) % 7 / 100 for (p,) in paths]
        assert row["downstream"] == {"hellaswag/acc": pytest.approx(sum(acc) / 2)}
    assert "hellaswag/acc |" in (out / "report.md").read_text()
    assert main(args) == 0 and len(scored) == 4  # cached beside the run: not scored again


def test_the_edge_warning_says_why_a_grid_has_no_inside():
    from lrm_train.experiments.compare import edge_words

    row = dict(arm="lrm", optimizer="adamw", selected_lr=0.01, at_grid_edge=True, sweep_finished=True)
    assert edge_words([row], lr_points=1, allow_edge=True).startswith(
        "**WARNING: selected LR on the edge of the grid for lrm (adamw, 0.01)**: a grid of 1 LR has no inside"
    )
    assert "the held-out phase of that optimizer did not run" in edge_words([row], lr_points=5, allow_edge=False)
    inside = dict(row, at_grid_edge=False)
    assert edge_words([inside], lr_points=3, allow_edge=False) == "Every selected LR lies inside its grid."


def test_the_gpu_scale_comparison_compiles_its_decoder_layers():
    cfg = compose_schema(
        "compare", CompareConfig, ["experiment=compare_0p5b", 'train_extra=["data.source=x"]', "tuned_config=null"]
    )
    assert all(run.cfg.train.compile for run in plan(cfg))


def test_an_arm_may_change_multipliers_but_a_shape_or_the_weight_decay_is_refused_in_one_line(
    data_root, tmp_path, capsys
):
    out = tmp_path / "out"
    args = micro_args(data_root, out, lr_points=1)
    head = '+arms.head=["lrm=none","model.lm_head_multiplier=0.5","optim.lm_head.lr_mult=2.0"]'
    runs = plan(compose_schema("compare", CompareConfig, arm_overrides([*args, head])))
    head_runs = [r for r in runs if r.labels["arm"] == "head"]
    assert {(r.cfg.model.lm_head_multiplier, r.cfg.optim.lm_head.lr_mult) for r in head_runs} == {(0.5, 2.0)}
    assert 0.5 not in {r.cfg.model.lm_head_multiplier for r in runs if r.labels["arm"] == "mup"}  # the arm's own
    assert main([*args, '+arms.wide=["model.intermediate_size=128"]']) == 2
    assert main([*args, '+arms.wd=["optim.weight_decay=0.5"]']) == 2
    wide, wd = capsys.readouterr().err.strip().splitlines()
    assert wide.startswith("error: config: run wide-adamw-lr0.01-s0 has another model config than mup-adamw-lr0.01-s0")
    assert "model.intermediate_size=128, not 64; an arm may change only multipliers" in wide
    assert "optim.weight_decay=0.5, not 0.1" in wd
    assert not out.exists()


def test_the_transplant_arm_waits_for_the_lrm_arms_selection_then_carries_its_folded_multipliers(data_root, tmp_path):
    """compare_cpu's transplant arm (its LRM arm: lrm): planned, waiting, until lrm's sweep has finished; then its
    runs take the multipliers that lrm's selected run learned, folded by ``static_transplant``."""
    out = tmp_path / "out"
    keep = ("~arms.transplant", "~transplant.transplant")
    args = [a for a in micro_args(data_root, out, lr_points=1, seeds="[1]") if a not in keep]
    runs = plan(compose_schema("compare", CompareConfig, args))
    transplant = [r for r in runs if r.labels["arm"] == "transplant"]
    assert [r.labels["phase"] for r in transplant] == [SELECTION, HELD_OUT] and all(r.waiting_for for r in transplant)
    assert transplant[0].waiting_for == "the LR sweep of lrm (adamw), whose learned multipliers it takes"
    assert transplant[0].cfg.lrm.placement.value == "none"
    (lrm,) = [r for r in runs if r.labels["arm"] == "lrm" and r.labels["phase"] == SELECTION]
    run_local([lrm], nproc=1, threads=1)

    runs = plan(compose_schema("compare", CompareConfig, args))
    sweep, held_out = [r for r in runs if r.labels["arm"] == "transplant"]
    assert not sweep.waiting_for and held_out.waiting_for  # the held-out phase waits for mup's and its own sweep
    folded = static_transplant([model_from_checkpoint(complete_checkpoints(lrm.run_dir)[-1])])
    for run in (sweep, held_out):
        assert {key: getattr(run.cfg.model, key) for key in folded} == folded
    assert folded["lm_head_multiplier"] != lrm.cfg.model.lm_head_multiplier  # LRM moved it: a real transplant
    assert sweep.cfg.lrm.placement.value == "none" and sweep.cfg.optim.lr == lrm.cfg.optim.lr


def test_the_report_gives_each_arm_its_tier_and_each_run_its_equilibration_times(finished):
    report = json.loads((finished / "report.json").read_text())
    text = (finished / "report.md").read_text()
    assert report["tiers"] == {"mup": "untuned, without LRM", "lrm": "untuned, with LRM"}  # tuned_config=null
    # the micro schedule: warmup 2, the decay over the last of 8 steps: 0.5 + 6 x 1 + 1/8 of lr x wd (0.1)
    reached = {(e["arm"], e["lr"]): e["equilibration_times"] for e in report["equilibration"]}
    assert set(reached) == {(run["arm"], run["lr"]) for run in report["runs"]}  # every run's (one per seed)
    for (_, lr), times in reached.items():
        assert times == pytest.approx(6.625 * lr * 0.1)
    assert "## 3. Equilibration times" in text and "**WARNING: 4 of 4 arm x LR settings end before one" in text
    reached = [dict(arm="lrm", optimizer="adamw", lr=0.01, equilibration_times=3.2)]
    assert "WARNING" not in equilibration_words(reached) and "| lrm | adamw | 0.01 | 3.20 |" in equilibration_words(
        reached
    )


def test_the_tiers_are_fig_7s():
    cfg = CompareConfig(arms={"mup": ["lrm=none"], "lrm": ["lrm=full"]}, lr_center={"adamw": 0.01, "muon": 0.01})
    cfg.tuned_config, cfg.untuned, cfg.transplant = "tune_cpu", ["lrm_untuned"], {"transplant": "lrm"}
    assert cfg.tier("mup", lrm=False) == "tuned, without LRM" and cfg.tier("lrm", lrm=True) == "tuned, with LRM"
    assert cfg.tier("lrm_untuned", lrm=True) == "untuned, with LRM"
    assert cfg.tier("transplant", lrm=False) == "tuned, without LRM: lrm's learned scales as fixed multipliers"


def test_a_missing_tuned_config_or_a_transplant_of_a_baseline_is_one_line(data_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*micro_args(data_root, out), "tuned_config=nope"]) == 2
    assert main([*micro_args(data_root, out, lr_points=1), "+transplant.copy=mup", '+arms.copy=["lrm=none"]']) == 2
    missing, baseline = capsys.readouterr().err.strip().splitlines()
    assert missing.startswith("error: config: tuned_config=nope: there is no ") and "tuned_config=null" in missing
    assert baseline == "error: config: transplant.copy=mup: arm mup has no learnable multipliers (lrm=none)"
    assert not out.exists()


def test_the_equilibrium_regime_lasts_one_equilibration_time_or_more_and_three_from_its_middle_up():
    runs = plan(compose_schema("compare", CompareConfig, ["experiment=compare_cpu_equilibrium"]))
    reached = {e["lr"]: e["equilibration_times"] for e in equilibration(runs)}
    assert sorted(reached) == pytest.approx(lr_grid(0.005, 5))
    assert [round(reached[lr], 2) for lr in sorted(reached)] == [1.06, 1.51, 2.13, 3.01, 4.26]  # as its header says


def test_the_cpu_defaults_plan_what_their_headers_say():
    """compare_cpu (AdamW: six LRs on tune_cpu's three selection seeds) and compare_cpu_muon (Muon, on tune_cpu_muon's
    values: seven LRs on seed 0), each with the four arms, then held-out seeds 3-7, disjoint from the tuning's; and
    compare_cpu_equilibrium (AdamW on tune_cpu_equilibrium's values: five LRs on its seed 0, then seeds 1-5)."""
    for experiment, optimizer, tuned, grid, selection, held_out, count in [
        ("compare_cpu", "adamw", "tune_cpu", lr_grid(0.008, 6), {0, 1, 2}, {3, 4, 5, 6, 7}, 92),
        ("compare_cpu_muon", "muon", "tune_cpu_muon", lr_grid(0.004 * math.sqrt(2), 7), {0}, {3, 4, 5, 6, 7}, 48),
        ("compare_cpu_equilibrium", "adamw", "tune_cpu_equilibrium", lr_grid(0.005, 5), {0}, {1, 2, 3, 4, 5}, 40),
    ]:
        settings = compose_schema("compare", CompareConfig, [f"experiment={experiment}"])
        assert settings.tuned_config == tuned
        runs = COMPARE.planned(settings)  # as the command plans: each config composed once for all its seeds
        assert len(runs) == count and {r.cfg.optim.name.value for r in runs} == {optimizer}
        sweep = [r for r in runs if r.labels["phase"] == "selection" and not r.waiting_for]
        assert sorted({r.cfg.optim.lr for r in sweep}) == pytest.approx(grid)
        assert {r.cfg.train.seed for r in sweep} == selection
        assert {r.cfg.train.seed for r in runs if r.labels["phase"] == "held_out"} == held_out
        assert {r.labels["arm"] for r in runs} == {"mup", "lrm", "lrm_untuned", "transplant"}
