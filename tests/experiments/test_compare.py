"""The LRM-vs-muP comparison on the micro model: every run, skip and resume, the report and its numbers, Slurm."""

import json
import os
import shutil
import stat

import matplotlib.image
import pytest
from runs import overrides

from lrm_train.config_compose import compose_schema
from lrm_train.experiments.compare import CompareConfig, lr_grid, main, plan, summarize
from lrm_train.experiments.experiment import tokens_per_run
from lrm_train.experiments.results import RunResult, read_metrics
from lrm_train.experiments.runner import FINISHED, PENDING, RunSpec, make_run, run_status
from lrm_train.optim.schedule import ScheduleName

STEPS = 8


def hydra_list(values: list[str]) -> str:
    return "[" + ",".join(json.dumps(v) for v in values) + "]"


def micro_args(data_root, out_dir, **extra) -> list[str]:
    """A comparison of 2 arms x 2 LRs x 1 seed under AdamW on the micro model (4 runs of 8 steps)."""
    train = {k: v for k, v in overrides(data_root, "unused").items() if k != "train.run_dir"}
    train.update({"train.max_steps": STEPS, "train.eval_every": 4, "train.log_every": 2, "schedule.warmup_steps": 2})
    args = {
        "out_dir": str(out_dir),
        "name": "micro",
        "train": hydra_list([f"{k}={v}" for k, v in train.items()]),
        "lr_center.adamw": 0.01,
        "lr_center.muon": 0.01,
        "optimizers": "[adamw]",
        "lr_points": 2,
        "seeds": "[0]",
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def final_val_loss(run_dir) -> float:
    return [r for r in read_metrics(run_dir) if "val_loss" in r][-1]["val_loss"]


def is_png_with_content(path) -> bool:
    image = matplotlib.image.imread(path)
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 100 and image.std() > 0.01


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    assert main(micro_args(data_root, out)) == 0
    return out


def test_every_run_exists_and_finished(data_root, finished):
    cfg = compose_schema("compare", CompareConfig, micro_args(data_root, finished))
    runs = plan(cfg)
    assert len(runs) == 2 * 2
    names = sorted(p.name for p in (finished / "runs").iterdir())
    assert names == sorted(r.name for r in runs)
    for run in runs:
        assert run_status(run) == FINISHED
        assert [r["step"] for r in read_metrics(run.run_dir)] == list(range(2, STEPS + 1, 2))
        assert run.cfg.logging.wandb.group == "micro"
    lrs = sorted({r.cfg.optim.lr for r in runs})
    assert lrs == pytest.approx(lr_grid(0.01, 2)) and lrs[1] / lrs[0] == pytest.approx(2**0.5)


def test_report_numbers_equal_the_runs_metrics(finished):
    report = json.loads((finished / "report.json").read_text())
    text = (finished / "report.md").read_text()
    assert {(r["arm"], r["optimizer"]) for r in report["rows"]} == {(a, "adamw") for a in ("mup", "lrm")}
    for row in report["rows"]:
        by_lr = {}
        for p in row["lr_curve"]:
            (run,) = [
                r
                for r in report["runs"]
                if (r["arm"], r["optimizer"], r["lr"]) == (row["arm"], row["optimizer"], p["lr"])
            ]
            by_lr[p["lr"]] = final_val_loss(run["run_dir"])
            assert p["mean"] == by_lr[p["lr"]] and p["std"] is None
        assert row["best_lr"] == min(by_lr, key=by_lr.get)
        assert row["finals"] == [by_lr[row["best_lr"]]]
        assert f"{row['final_mean']:.4f} (1 seed)" in text
        assert row["lr_range"] == pytest.approx(max(by_lr.values()) - min(by_lr.values()))
    rows = {(r["arm"], r["optimizer"]): r for r in report["rows"]}
    moved = rows[("lrm", "adamw")]["multipliers_moved_most"]
    records = read_metrics(rows[("lrm", "adamw")]["run_dirs"][0])
    assert len(moved) == 5 and "multipliers_moved_most" not in rows[("mup", "adamw")]
    for name, ratio in moved.items():
        values = [r[f"lrm/{name}"] for r in records if f"lrm/{name}" in r]
        assert ratio == pytest.approx(values[-1] / values[0]) and f"`{name}` x{ratio:.3g}" in text
    for optimizer in ("adamw",):
        gap = rows[("lrm", optimizer)]["gap"]
        expected = rows[("lrm", optimizer)]["final_mean"] - rows[("mup", optimizer)]["final_mean"]
        assert gap["final"] == pytest.approx(expected)
        assert gap["curve"]["mean"][-1] == pytest.approx(expected)
        assert gap["exceeds_spread"] is None and gap["seed_spread"] is None  # one seed: unknown, never invented
        assert f"{gap['final']:+.4f}" in text and "seed spread is unknown" in text


def test_plots_are_non_empty_images(finished):
    report = json.loads((finished / "report.json").read_text())
    assert set(report["figures"]) == {"val_loss", "gap", "lr_sensitivity", "multipliers", "norms_abm"}
    for name in report["figures"].values():
        assert is_png_with_content(finished / name), name
        assert f"]({name})" in (finished / "report.md").read_text()


def test_rerun_skips_finished_runs_and_resumes_unfinished_ones(data_root, finished, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    runs = plan(compose_schema("compare", CompareConfig, micro_args(data_root, out)))
    cut, untouched = runs[0], runs[1:]
    shutil.rmtree(cut.run_dir / "checkpoints" / f"step_{STEPS:08d}")  # as if killed after step 4's checkpoint
    assert run_status(cut) == PENDING
    before = {r.name: (r.run_dir / "metrics.jsonl").stat().st_mtime_ns for r in untouched}
    expected = final_val_loss(cut.run_dir)

    assert main(micro_args(data_root, out, report="only")) == 0  # from what has finished: 3 of 4
    report = json.loads((out / "report.json").read_text())
    assert cut.name not in {r["name"] for r in report["runs"]} and len(report["runs"]) == 3
    assert "3 of 4 runs finished" in (out / "report.md").read_text()

    capsys.readouterr()
    assert main(micro_args(data_root, out)) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished, skipped") == 3 and f"{cut.name}: training" in printed
    assert {r.name: (r.run_dir / "metrics.jsonl").stat().st_mtime_ns for r in untouched} == before
    assert "resumed from" in (cut.run_dir / "train_rank0.log").read_text()
    assert [r["step"] for r in read_metrics(cut.run_dir)] == list(range(2, STEPS + 1, 2))
    assert final_val_loss(cut.run_dir) == pytest.approx(expected, rel=1e-5)  # exact resume: the same loss
    assert len(json.loads((out / "report.json").read_text())["runs"]) == 4


def test_gap_and_spread_over_seeds():
    """Two seeds: mean +- std, the gap paired by seed, and whether it exceeds the seed spread."""
    cfg = CompareConfig(arms={"mup": ["lrm=none"], "lrm": ["lrm=full"]}, lr_center={"adamw": 0.01, "muon": 0.01})
    cfg.optimizers, cfg.lr_points = ["adamw"], 2
    high = lr_grid(0.01, 2)[1]

    def result(arm, lr, seed, final):
        run = RunSpec(f"{arm}{lr}{seed}", [], _FakeRun(), dict(arm=arm, optimizer="adamw", lr=lr, seed=seed))
        val = [2 * final, final]  # the gap at the first evaluation is twice the final one
        records = [dict(step=50, tokens_seen=100), dict(step=100, tokens_seen=200)]
        return RunResult(run, FINISHED, final, [100, 200], val, records)

    results = [
        result("mup", 0.01, 0, 3.00),
        result("mup", 0.01, 1, 3.02),
        result("mup", high, 0, 3.10),
        result("mup", high, 1, 3.12),
        result("lrm", 0.01, 0, 2.90),
        result("lrm", 0.01, 1, 2.94),
        result("lrm", high, 0, 2.85),
        result("lrm", high, 1, 2.87),
    ]
    rows = {r["arm"]: r for r in summarize(cfg, results)["rows"]}
    assert rows["mup"]["best_lr"] == 0.01 and rows["lrm"]["best_lr"] == high
    assert rows["lrm"]["final_mean"] == pytest.approx(2.86) and rows["lrm"]["final_std"] == pytest.approx(0.01414, 1e-3)
    gap = rows["lrm"]["gap"]
    assert gap["per_seed"] == pytest.approx([-0.15, -0.15]) and gap["final"] == pytest.approx(-0.15)
    assert gap["seed_spread"] == pytest.approx(0.01414, 1e-3) and gap["exceeds_spread"] is True
    assert gap["curve"]["tokens"] == [100, 200] and gap["curve"]["mean"] == pytest.approx([-0.30, -0.15])
    assert gap["decay_start_tokens"] == 100 and gap["at_decay_start"] == pytest.approx(-0.30)  # decay from step 50
    assert rows["mup"]["lr_range"] == pytest.approx(0.10)
    assert rows["lrm"]["best_at_grid_edge"] and rows["mup"]["best_at_grid_edge"]  # a grid of two: both are edges

    small = [result("mup", 0.01, 0, 3.00), result("mup", 0.01, 1, 3.10), result("lrm", 0.01, 0, 2.99)]
    small.append(result("lrm", 0.01, 1, 3.07))
    gap = {r["arm"]: r for r in summarize(cfg, small)["rows"]}["lrm"]["gap"]
    assert gap["final"] == pytest.approx(-0.02) and gap["exceeds_spread"] is False


class _FakeRun:
    """The parts of a RunConfig the summary reads."""

    class schedule:
        name, decay_fraction = ScheduleName.constant_exp_decay, 0.5

    class train:
        max_steps, run_dir = 100, "nowhere"


def test_config_errors_are_one_line_before_any_run(data_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(micro_args(data_root, out, lr_pointz=3)) == 2
    assert main(micro_args(data_root, out, train=hydra_list(["train.max_stepz=3"]))) == 2
    assert main(micro_args(data_root, out, baseline="nope")) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("error: config: ") for e in errors)
    assert "lr_pointz" in errors[0] and "train.max_stepz" in errors[1] and "baseline='nope'" in errors[2]
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
    runs = plan(compose_schema("compare", CompareConfig, args))
    shutil.rmtree(runs[0].run_dir)  # a finished AdamW run gone; the Muon runs never ran
    pending = [r for r in runs if run_status(r) == PENDING]
    assert len(runs) == 4 and len(pending) == 3

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
    assert "queued as job 101" in capsys.readouterr().out


def test_estimate_counts_the_tokens_of_the_batch_ramp(data_root, tmp_path, capsys):
    values = overrides(data_root, tmp_path / "run", **{"train.grad_accum": 2, "schedule.batch_ramp_steps": 4})
    values["schedule.batch_ramp_start"] = 0.5
    run = make_run("one", tmp_path / "run", [f"{k}={v}" for k, v in values.items() if k != "train.run_dir"])
    # micro-batches of 2 per step: 1, 2, 2, 2 during the ramp (0.5, 0.625, 0.75, 0.875 of the batch), then 4 x 2
    assert tokens_per_run(run, world_size=1) == 15 * 4 * 32
    assert tokens_per_run(run, world_size=8) == 8 * 15 * 4 * 32
    assert main([*micro_args(data_root, tmp_path / "out"), "--estimate"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("4 runs x ") and "assuming 35% MFU" in printed
    assert not (tmp_path / "out").exists()


@pytest.mark.multiprocess
def test_nproc_runs_each_run_under_torchrun_with_ddp(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    args = [*micro_args(data_root, out, lr_points=1, nproc=2), "~arms.lrm"]  # one run: the baseline's
    assert main(args) == 0
    (run,) = plan(compose_schema("compare", CompareConfig, args))
    assert run_status(run) == FINISHED and run.name.startswith("mup-adamw")
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
    assert len(scored) == 2  # each arm's best-LR final checkpoint
    for row in report["rows"]:
        (run_dir,) = row["run_dirs"]
        (path,) = [p for p in scored if str(p).startswith(run_dir)]
        assert path.name == f"step_{STEPS:08d}"
        assert row["downstream"] == {"hellaswag/acc": 0.25 + len(str(path)) % 7 / 100}
    assert "hellaswag/acc |" in (out / "report.md").read_text()
    assert main(args) == 0 and len(scored) == 2  # cached beside the run: not scored again


def test_a_one_point_grid_does_not_claim_its_lr_is_inside_the_grid():
    from lrm_train.experiments.compare import _edge_words

    row = dict(arm="lrm", optimizer="adamw", best_at_grid_edge=False, grid_finished=True)
    assert _edge_words([row], lr_points=1).startswith("**One LR per arm**")
    assert _edge_words([row], lr_points=3) == "Every best LR lies inside its grid."


def test_the_gpu_scale_comparison_compiles_its_decoder_layers():
    cfg = compose_schema("compare", CompareConfig, ["experiment=compare_0p5b", 'train_extra=["data.source=x"]'])
    assert all(run.cfg.train.compile for run in plan(cfg))
