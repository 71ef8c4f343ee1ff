"""Tuning the muP baseline: the search's stages, widening at an edge and the cap, the tuned config the trainer and
the comparison take, skip-finished and resume, and config errors."""

import functools
import json
import math
import shutil
import uuid

import pytest
from runs import overrides

from lrm_train.config_compose import compose_schema
from lrm_train.experiments import compare, tune
from lrm_train.experiments.tune import TuneConfig, main, plan, point_key, run_name, search
from lrm_train.train import compose

# One stage-2 axis (key) and no widening: 9 grid runs and 2 key runs of the micro model, 8 steps each.
# One selection seed: the mechanics these tests check need no more (tune_cpu averages three).
MICRO = dict(stage2="[key]", max_widen=0, allow_edge="true", parallel=1, selection_seeds="[0]")


def hydra_list(values: list[str]) -> str:
    return "[" + ",".join(json.dumps(v) for v in values) + "]"


def micro_train(data_root) -> list[str]:
    values = {k: v for k, v in overrides(data_root, "unused").items() if k != "train.run_dir"}
    values.update({"train.eval_every": 2, "train.log_every": 2, "optim.lr": 0.01})
    return [f"{k}={v}" for k, v in values.items()]


def micro_args(data_root, out_dir, name, **extra) -> list[str]:
    args = {"out_dir": str(out_dir), "name": name, "train": hydra_list(micro_train(data_root)), **MICRO, **extra}
    return [f"{k}={v}" for k, v in args.items()]


def settings(**changes) -> TuneConfig:
    return TuneConfig(**{"stage2": ["embedding", "residual", "key", "embedding_lr", "lm_head_lr"], **changes})


def bowl(optimum: dict[str, int]):
    """A loss whose minimum is at ``optimum`` (offsets; other axes at 0)."""
    return lambda p: sum((k - optimum.get(a, 0)) ** 2 + 0.1 * abs(k) for a, k in p.items())


def test_stage_one_is_the_lr_x_lm_head_grid_then_each_axis_one_octave_around_the_best_in_order():
    found = search(settings(), bowl({"lr": 1, "lm_head": -1, "key": 1}))
    assert not found.waiting and [s.axes for s in found.stages] == [
        ("lr", "lm_head"),
        ("embedding",),
        ("residual",),
        ("key",),
        ("embedding_lr",),
        ("lm_head_lr",),
    ]
    grid = found.stages[0]
    assert grid.offsets == {"lr": [-1, 0, 1, 2], "lm_head": [-2, -1, 0, 1]}  # each widened once past its edge
    assert grid.best == {**dict.fromkeys(found.best, 0), "lr": 1, "lm_head": -1}
    key = found.stages[3]
    assert key.offsets == {"key": [-1, 0, 1, 2]} and key.best["key"] == 1
    # stage 2's points move one axis at a time around the best so far
    embedding_points = [dict(k) for k in found.stages[1].losses]
    assert all(p["lr"] == 1 and p["lm_head"] == -1 and p["residual"] == 0 for p in embedding_points)
    assert sorted(p["embedding"] for p in embedding_points) == [-1, 0, 1]
    assert found.best == {**dict.fromkeys(found.best, 0), "lr": 1, "lm_head": -1, "key": 1}
    assert len(found.points) == 16 + 4 * 2 + 3  # the grid, then x0.5 and x2 per axis (x1 is the best so far)


def test_an_interior_optimum_stops_without_widening():
    found = search(settings(), bowl({}))
    assert all(not s.edge and not any(s.widened.values()) for s in found.stages)
    assert len(found.points) == 9 + 5 * 2


def test_an_edge_widens_one_point_at_a_time_until_interior():
    found = search(settings(stage2=[], max_widen=3), bowl({"lr": -3}))
    grid = found.stages[0]
    assert grid.offsets["lr"] == [-4, -3, -2, -1, 0, 1] and grid.widened["lr"] == 3 and grid.best["lr"] == -3
    assert grid.widened["lm_head"] == 0 and not grid.edge and not found.waiting


def test_an_edge_past_the_cap_is_not_tuned_and_the_later_stages_wait():
    found = search(settings(max_widen=2), bowl({"lr": 5}))
    assert found.stuck and "interior optimum of lr" in found.waiting
    assert found.stages[0].edge == ["lr"] and found.stages[0].offsets["lr"] == [-1, 0, 1, 2, 3]
    assert len(found.stages) == 1  # stage 2 not reached
    allowed = search(settings(max_widen=2, allow_edge=True), bowl({"lr": 5}))
    assert not allowed.waiting and not allowed.stuck and allowed.stages[0].edge == ["lr"] and len(allowed.stages) == 6


def test_a_stage_not_finished_waits_and_diverged_points_are_never_best():
    losses = {point_key({**dict.fromkeys(tune.STAGE1 + tune.OCTAVE_AXES, 0), "lr": 1}): math.inf}
    found = search(settings(), lambda p: losses.get(point_key(p), bowl({"lr": 1})(p)))
    assert (found.stages[0].best["lr"], found.stages[0].best["lm_head"]) == (0, 0)
    waiting = search(settings(), lambda p: None if p["lr"] == 1 else 1.0)
    assert "lrxlm_head sweep" in waiting.waiting and not waiting.stuck and len(waiting.stages) == 1


def test_the_plan_holds_the_grids_values_and_counts_the_waiting_stages(data_root, tmp_path, capsys):
    cfg = compose_schema("tune", TuneConfig, micro_args(data_root, tmp_path, "plan", stage2="[key,lm_head_lr]"))
    runs = plan(cfg)
    ready = [r for r in runs if not r.waiting_for]
    assert len(ready) == 9 and len(runs) == 13
    base = next(r for r in runs if r.name == "mup-s0").cfg
    lrs = sorted({r.cfg.optim.lr for r in ready})
    heads = sorted({r.cfg.model.lm_head_multiplier for r in ready})
    assert lrs == pytest.approx([0.01 / math.sqrt(2), 0.01, 0.01 * math.sqrt(2)])
    assert heads == pytest.approx([base.model.lm_head_multiplier * f for f in (0.5, 1, 2)])
    assert {r.cfg.lrm.placement.value for r in runs} == {"none"}  # the muP baseline
    assert {r.cfg.train.eval_last for r in runs} == {cfg.final_evals}  # a run is read by its final loss alone
    waiting = [r for r in runs if r.waiting_for]
    key = base.model.key_multiplier
    assert sorted(r.cfg.model.key_multiplier for r in waiting if r.labels["key"]) == [key / 2, key * 2]
    head_lr = base.optim.lm_head.lr_mult
    assert sorted(r.cfg.optim.lm_head.lr_mult for r in waiting if r.labels["lm_head_lr"]) == [head_lr / 2, head_lr * 2]
    residual = tune.axis_values(base, "residual", 2.0)
    assert residual["model.mlp_multipliers"] == [base.model.mlp_multipliers[0], 2 * base.model.mlp_multipliers[1]]
    assert main(micro_args(data_root, tmp_path, "plan", stage2="[key,lm_head_lr]") + ["--estimate"]) == 0
    out = capsys.readouterr().out
    assert "13 runs (4 of them waiting" in out and "at most 13 runs if every axis widens max_widen=0 times" in out
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def tuned(data_root, tmp_path_factory):
    """A finished micro tuning, its config written under configs/tuned (removed afterwards)."""
    out = tmp_path_factory.mktemp("tune")
    name = f"test_micro_{uuid.uuid4().hex[:8]}"
    created_dir = not tune.TUNED_DIR.exists()
    try:
        assert main(micro_args(data_root, out, name)) == 0
        yield out, name
    finally:
        (tune.TUNED_DIR / f"{name}.yaml").unlink(missing_ok=True)
        if created_dir and tune.TUNED_DIR.exists() and not any(tune.TUNED_DIR.iterdir()):
            tune.TUNED_DIR.rmdir()


def test_the_report_draws_each_axis_and_the_tuned_config_changes_the_trainers_fields(data_root, tuned):
    out, name = tuned
    report = json.loads((out / "report.json").read_text())
    assert report["tuned_config"] == str(tune.TUNED_DIR / f"{name}.yaml")
    assert set(report["figures"]) == {"lr", "lm_head", "key"}
    assert all((out / f).stat().st_size > 1000 for f in report["figures"].values())
    assert len(report["curves"]["lr"]) == 3 and len(report["curves"]["key"]) == 3
    centre = next(c["loss"] for c in report["curves"]["key"] if c["factor"] == 1)
    assert centre == min(c["loss"] for c in report["curves"]["lr"])  # the key axis centres on stage 1's best run
    # (a key given on the command line wins over the tuned config's: the micro runs' optim.lr is left out)
    cfg = compose([*(o for o in micro_train(data_root) if not o.startswith("optim.lr=")), f"+tuned={name}"])
    tuned_keys = {"optim.lr", "model.lm_head_multiplier", "model.key_multiplier"}  # the micro search's axes
    assert set(report["tuned"]) == tuned_keys
    for key, value in report["tuned"].items():
        assert functools.reduce(getattr, key.split("."), cfg) == value
    assert report["tuned"] != report["muP"]  # a test that would pass on the muP values alone says nothing
    assert "+tuned=" in (out / "report.md").read_text()


def test_the_comparison_takes_the_tuned_config_for_every_tuned_arm_and_keeps_its_own_lrs(data_root, tuned, tmp_path):
    out, name = tuned
    report = json.loads((out / "report.json").read_text())
    t, mup = report["tuned"], report["muP"]
    args = [
        f"out_dir={tmp_path}",
        f"train={hydra_list(micro_train(data_root))}",
        f"tuned_config={name}",
        "optimizers=[adamw,muon]",
        "lr_center.adamw=0.02",
        "lr_center.muon=0.02",
        "lr_points=3",
    ]
    all_runs = compare.plan(compose_schema("compare", compare.CompareConfig, compare.arm_overrides(args)))
    runs = [r for r in all_runs if r.labels["arm"] != "lrm_untuned"]  # compare_cpu's arm at the muP values
    assert {r.cfg.model.lm_head_multiplier for r in runs} == {t["model.lm_head_multiplier"]}
    assert {r.cfg.model.key_multiplier for r in runs} == {t["model.key_multiplier"]}
    untuned = [r for r in all_runs if r.labels["arm"] == "lrm_untuned"]
    assert {r.cfg.model.lm_head_multiplier for r in untuned} == {mup["model.lm_head_multiplier"]}
    assert {r.cfg.model.key_multiplier for r in untuned} == {mup["model.key_multiplier"]}
    assert {r.cfg.optim.name.value for r in runs} == {"adamw", "muon"}  # muon's group options keep the tuned values
    assert {r.cfg.optim.lr for r in runs if not r.waiting_for} == set(compare.lr_grid(0.02, 3))


def test_a_rerun_skips_finished_runs_and_trains_only_a_missing_one(data_root, tuned, capsys):
    out, name = tuned
    best = json.loads((out / "report.json").read_text())["best"]
    missing = run_name({**best, "key": 1}, 0)  # the key axis' x2 point around stage 1's best (key at x1)
    shutil.rmtree(out / "runs" / missing)
    capsys.readouterr()
    assert main(micro_args(data_root, out, name)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("finished, skipped" in line for line in lines) == 10
    assert [line for line in lines if line.endswith(": training")] == [f"[11/11] {missing}: training"]


def test_an_edge_past_the_cap_exits_1_and_writes_no_config(data_root, tuned, monkeypatch, capsys):
    out, name = tuned
    # The finished runs, read as if the best were on the LR grid's edge.
    monkeypatch.setattr(tune.Planner, "loss", lambda self, p: -p["lr"])
    fresh = f"{name}_edge"
    assert main(micro_args(data_root, out, fresh, allow_edge="false", report="only")) == 1
    assert "not tuned" in capsys.readouterr().err
    assert not (tune.TUNED_DIR / f"{fresh}.yaml").exists()
    assert "EDGE (not tuned)" in (out / "report.md").read_text()


def test_a_last_stage_that_widens_trains_its_new_point_before_the_report(data_root, tmp_path, monkeypatch):
    """The last axis' best on its edge: the point beyond it is trained in the same command (no stage waits for it,
    so nothing else makes the loop plan again), and the tuned config is written."""
    measured = tune.Planner.loss
    key_best_beyond_the_first_grid = bowl({"key": 2})
    monkeypatch.setattr(
        tune.Planner,
        "loss",
        lambda self, p: None if measured(self, p) is None else key_best_beyond_the_first_grid(p),
    )
    name = f"test_micro_{uuid.uuid4().hex[:8]}"
    try:
        assert main(micro_args(data_root, tmp_path, name, max_widen=2, allow_edge="false")) == 0
        report = json.loads((tmp_path / "report.json").read_text())
        assert [c["factor"] for c in report["curves"]["key"]] == [0.5, 1, 2, 4, 8]  # x4 best, x8 beyond it
        assert report["best"]["key"] == 2 and (tune.TUNED_DIR / f"{name}.yaml").exists()
    finally:
        (tune.TUNED_DIR / f"{name}.yaml").unlink(missing_ok=True)


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("lr_ratoi=2", "lr_ratoi"),
        ("stage2=[keys]", "keys"),
        ("grid_points=2", "grid_points"),
        ("train=[optim.lrr=1]", "lrr"),
    ],
)
def test_a_bad_key_is_one_line_before_any_run(data_root, tmp_path, capsys, override, culprit):
    assert main(micro_args(data_root, tmp_path, "bad") + [override]) == 2
    err = capsys.readouterr().err.strip()
    assert culprit in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()
