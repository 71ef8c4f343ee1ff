import json
import math
from types import SimpleNamespace

import pytest

from lrm_train.experiments import transfer
from lrm_train.experiments.analysis import SweepParametrization
from lrm_train.experiments.experiment import ExperimentFailed
from lrm_train.experiments.transfer import (
    TRANSFER,
    TransferSettings,
    main,
    plan,
    report,
)
from tests.experiments.micro_analysis import is_png_with_content, micro_trainer

WIDTHS = [32, 64, 128]


def hydra_list(values: list[str]) -> str:
    return "[" + ",".join(f"'{v}'" for v in values) + "]"


def micro_args(data_root, out_dir, **extra) -> list[str]:
    """A micro sweep: widths 32..128 (heads of 16), 2 steps per run, the micro trainer."""
    values = dict(out_dir=out_dir, widths="[32,64,128]", head_dim=16, steps=2)
    values.update(
        trainer=hydra_list(["lrm=none", "logging.trajectories=false", *micro_trainer(data_root, steps=2, model=False)]),
        **extra,
    )
    return [f"{key}={value}" for key, value in values.items()]


def bowl(optimum: dict[int, int], offset: dict[int, float], points: int = 5) -> dict:
    """Synthetic final losses per width: a parabola in the grid index around ``optimum[width]``, raised by
    ``offset[width]``."""
    return {w: [3.0 + offset[w] + 0.1 * (i - optimum[w]) ** 2 for i in range(points)] for w in WIDTHS}


def fake_losses(monkeypatch, by_optimizer: dict[str, dict]) -> None:
    """The report reads ``by_optimizer`` (optimizer -> width -> loss per grid index) in place of finished runs."""
    losses = {(o, w): points for o, by_width in by_optimizer.items() for w, points in by_width.items()}
    monkeypatch.setattr("lrm_train.experiments.transfer.final_losses", lambda runs, points: losses)


LOWER_WITH_WIDTH = {32: 0.2, 64: 0.1, 128: 0.0}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (dict(widths=[64, 128]), "widths: the LR transfer check needs 3 widths or more, got [64, 128]"),
        (dict(optimizers=["sgd"]), "optimizers: 'sgd' is not one of adamw, muon"),
        (dict(optimizers=[]), "optimizers=[] must be distinct and name at least one"),
        (dict(parametrization="mupp"), "parametrization='mupp' is not one of standard, mup, mup_multiplier"),
        (dict(lr_center={"adamw": 0.0, "muon": 1e-2}), "lr_center.adamw=0.0 must be > 0"),
        (dict(lr_center={"muon": 1e-2}), "lr_center has no LR for optimizer 'adamw'"),
        (dict(lr_points=1), "lr_points=1 must be >= 2"),
        (dict(steps=0), "steps=0 must be >= 1"),
        (dict(loss_tolerance=-0.1), "loss_tolerance=-0.1 must be >= 0"),
    ],
)
def test_bad_settings_are_one_line(extra, message):
    with pytest.raises(ValueError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        TransferSettings(**extra)


def test_bad_input_through_the_command_is_one_line_before_any_work(data_root, tmp_path, capsys):
    assert main(micro_args(data_root, tmp_path / "out", parametrization="mupp")) == 2
    assert main(micro_args(data_root, tmp_path / "out", widths="[32,48,128]")) == 2  # 48 is no multiple of 2 x 16
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "parametrization" in errors[0] and "width 48" in errors[1]
    assert not (tmp_path / "out").exists()


def test_the_default_config_sweeps_three_widths_into_a_folder_per_parametrization():
    settings, runs = TRANSFER.compose(["parametrization=standard", "optimizers=[adamw]", "lr_points=2"])
    assert settings.out_dir == "experiments/transfer/standard"
    assert settings.lr_center == {"adamw": 1.7e-2, "muon": 1.2e-2}
    assert sorted({r.cfg.model.hidden_size for r in runs}) == [64, 128, 256] and settings.seeds == [0, 1, 2]
    assert len(runs) == 3 * 2 * 3  # widths x LRs x seeds
    assert {r.cfg.model.parametrization for r in runs} == {"standard"} and {r.cfg.lrm.placement for r in runs} == {
        "none"
    }


def micro_settings(data_root, out_dir, **extra) -> TransferSettings:
    values = dict(out_dir=str(out_dir), widths=WIDTHS, head_dim=16, steps=3, trainer=micro_trainer(data_root, 3, False))
    return TransferSettings(**{**values, **extra})


def test_the_plan_holds_every_width_and_lr_of_each_optimizers_grid(data_root, tmp_path):
    centre = {"adamw": 2e-3, "muon": 5e-3}
    runs = plan(micro_settings(data_root, tmp_path, lr_center=centre))
    assert [(r.labels["optimizer"], r.labels["width"], r.labels["lr_index"]) for r in runs] == [
        (o, w, i) for o in ("adamw", "muon") for w in WIDTHS for i in range(5)
    ]
    for run in runs:
        optimizer = run.labels["optimizer"]
        assert run.labels["lr"] == pytest.approx(centre[optimizer] * 2 ** ((run.labels["lr_index"] - 2) / 2))
        assert run.cfg.optim.lr == run.labels["lr"] and run.cfg.optim.name == optimizer
        assert run.cfg.model.hidden_size == run.labels["width"]
        assert (run.cfg.train.max_steps, run.cfg.train.eval_every, run.cfg.train.ckpt_every) == (3, 3, 3)
    assert len({r.run_dir for r in runs}) == len(runs)


@pytest.mark.parametrize(
    ("setting", "adamw", "muon"),
    [
        ("mup", "mup", "mup"),
        ("standard", "standard", "standard"),
        ("mup_multiplier", "mup_multiplier_adamw", "mup_multiplier_muon"),
    ],
)
def test_each_optimizer_gets_its_parametrization(setting, adamw, muon):
    setting = SweepParametrization(setting)
    assert (setting.for_optimizer("adamw"), setting.for_optimizer("muon")) == (adamw, muon)


def test_the_plan_gives_each_run_its_optimizers_mup_multiplier_form(data_root, tmp_path):
    runs = plan(micro_settings(data_root, tmp_path, parametrization="mup_multiplier", lr_points=2))
    assert len(runs) == 2 * 3 * 2
    for run in runs:
        assert run.cfg.optim.name == run.labels["optimizer"]
        assert (
            run.cfg.model.parametrization
            == f"mup_multiplier_{run.labels['optimizer']}"
            == run.labels["parametrization"]
        )


def synthetic_report(tmp_path, monkeypatch, by_optimizer: dict[str, dict], **extra):
    """The report of ``by_optimizer`` (optimizer -> width -> loss per grid index) as if the runs had finished."""
    fake_losses(monkeypatch, by_optimizer)
    settings = TransferSettings(out_dir=str(tmp_path), widths=WIDTHS, optimizers=list(by_optimizer), **extra)
    return report(settings, [])


def test_an_lr_optimum_within_one_step_across_widths_passes(tmp_path, monkeypatch, capsys):
    both = bowl({32: 1, 64: 2, 128: 2}, LOWER_WITH_WIDTH)
    synthetic_report(tmp_path, monkeypatch, {"adamw": both, "muon": both}, lr_center={"adamw": 4e-3, "muon": 2e-3})
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2:] == [
        "LR transfer (adamw): best LR per width {32: 0.00283, 64: 0.004, 128: 0.004}; spread 1 sqrt(2)-steps",
        "LR transfer (muon): best LR per width {32: 0.00141, 64: 0.002, 128: 0.002}; spread 1 sqrt(2)-steps",
    ]
    assert "Wider is better (adamw): holds at LR 0.00283, 0.004, 0.00566 (no loss rise over 0.02 with width)" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["results"]["adamw"]["best_index"] == {"32": 1, "64": 2, "128": 2}
    assert report["results"]["adamw"]["spread"] == 1 and report["results"]["adamw"]["at_grid_edge"] == []
    assert report["lr_grids"]["adamw"] == pytest.approx([4e-3 * 2 ** (k / 2) for k in range(-2, 3)])
    assert report["lr_grids"]["muon"] == pytest.approx([2e-3 * 2 ** (k / 2) for k in range(-2, 3)])
    assert is_png_with_content(tmp_path / "transfer_adamw.png") and is_png_with_content(tmp_path / "transfer_muon.png")


def test_an_lr_optimum_that_drifts_two_steps_fails_the_command(data_root, tmp_path, monkeypatch, capsys):
    fake_losses(monkeypatch, {"adamw": bowl({32: 1, 64: 2, 128: 3}, LOWER_WITH_WIDTH)})
    assert main(micro_args(data_root, tmp_path, optimizers="[adamw]", report="only", **{"lr_center.adamw": 4e-3})) == 1
    captured = capsys.readouterr()
    line = "LR transfer (adamw): best LR per width {32: 0.00283, 64: 0.004, 128: 0.00566}; spread 2 sqrt(2)-steps"
    assert line in captured.out.splitlines()
    [error] = captured.err.strip().splitlines()
    assert error == f"error: {line} (see {tmp_path}/report.md)"
    assert json.loads((tmp_path / "report.json").read_text())["results"]["adamw"]["transfers"] is False


def test_one_optimizer_that_does_not_transfer_fails_the_report(tmp_path, monkeypatch):
    good, drifting = bowl({32: 1, 64: 2, 128: 2}, LOWER_WITH_WIDTH), bowl({32: 0, 64: 2, 128: 4}, LOWER_WITH_WIDTH)
    with pytest.raises(ExperimentFailed, match=r"^LR transfer \(muon\): .*; spread 4 sqrt\(2\)-steps \(on the grid's "):
        synthetic_report(tmp_path, monkeypatch, {"adamw": good, "muon": drifting})
    assert json.loads((tmp_path / "report.json").read_text())["results"]["muon"]["at_grid_edge"] == [32, 128]


def test_a_wider_model_worse_beyond_the_tolerance_fails_and_within_it_passes(tmp_path, monkeypatch):
    worse = bowl({w: 2 for w in WIDTHS}, {32: 0.0, 64: 0.01, 128: 0.05})  # 64 -> 128: +0.04 at every LR
    with pytest.raises(ExperimentFailed, match=r"Wider is better \(adamw\): 3 violations beyond 0.02: w64->w128 at LR"):
        synthetic_report(tmp_path, monkeypatch, {"adamw": worse})
    synthetic_report(tmp_path, monkeypatch, {"adamw": worse}, loss_tolerance=0.05)


def test_a_diverged_run_is_no_best_lr_and_a_wider_divergence_near_the_optimum_is_a_violation(
    tmp_path, monkeypatch, capsys
):
    losses = bowl({w: 3 for w in WIDTHS}, LOWER_WITH_WIDTH)
    losses[32][3] = None  # the narrowest diverges at the others' best LR: its best is the lower neighbour (a tie)
    losses[128][4] = None  # the widest diverges next to its optimum
    with pytest.raises(ExperimentFailed, match="w64->w128 at LR 0.006 diverged"):
        synthetic_report(tmp_path, monkeypatch, {"adamw": losses}, lr_center={"adamw": 3e-3})
    assert "LR transfer (adamw): best LR per width {32: 0.003, 64: 0.00424, 128: 0.00424}; spread 1" in (
        capsys.readouterr().out
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["final_loss"]["adamw"]["128"][4] is None and report["results"]["adamw"]["transfers"] is True
    assert "| 128 | 3.9 | 3.4 | 3.1 | 3 | - | 0.004243 |" in (tmp_path / "report.md").read_text()


def test_a_micro_sweep_trains_and_reports(data_root, tmp_path, capsys):
    args = micro_args(data_root, tmp_path, optimizers="[adamw]", lr_points=2, loss_tolerance=100)
    status = main([*args, "parametrization=mup_multiplier"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert status == (0 if report["results"]["adamw"]["transfers"] else 1)
    assert not report["results"]["adamw"]["transfers"]  # two LR points: every best is on the grid's edge
    finals = report["final_loss"]["adamw"]
    assert set(finals) == {"32", "64", "128"} and all(math.isfinite(v) for f in finals.values() for v in f)
    assert is_png_with_content(tmp_path / "transfer_adamw.png")
    assert "## adamw (mup_multiplier_adamw)" in (tmp_path / "report.md").read_text()
    assert "LR transfer (adamw): best LR per width {32: " in capsys.readouterr().out


def test_each_point_is_the_mean_over_its_seeds_and_a_diverged_seed_diverges_it(tmp_path, monkeypatch):
    settings = TransferSettings(out_dir=str(tmp_path), widths=WIDTHS, head_dim=16, optimizers=["adamw"], lr_points=2,
                                seeds=[0, 1], trainer=["lrm=none"])  # fmt: skip
    runs = plan(settings)
    assert len(runs) == 3 * 2 * 2 and {r.run_dir.name for r in runs if r.labels["seed"] == 1} == {
        f"adamw_w{w}_lr{lr:.3g}_s1" for w in WIDTHS for lr in settings.grid("adamw")}  # fmt: skip
    finals = {(r.labels["width"], r.labels["lr_index"], r.labels["seed"]): 4.0 + r.labels["seed"] for r in runs}
    finals[32, 1, 1] = math.nan  # one seed diverged there
    results = [SimpleNamespace(run=r, final=finals[r.labels["width"], r.labels["lr_index"], r.labels["seed"]])
               for r in runs]  # fmt: skip
    monkeypatch.setattr(transfer, "finished", lambda runs: runs)
    monkeypatch.setattr(transfer, "run_status", lambda run: "finished")
    monkeypatch.setattr(transfer, "collect", lambda runs: results)
    losses = transfer.final_losses(runs, 2)
    assert losses["adamw", 64] == [4.5, 4.5] and losses["adamw", 32] == [4.5, None]


def test_agreement_on_the_grids_edge_is_inconclusive_and_fails(tmp_path, monkeypatch, capsys):
    at_top = bowl({w: 4 for w in WIDTHS}, LOWER_WITH_WIDTH)  # every width best at the highest LR: maybe beyond it
    with pytest.raises(ExperimentFailed, match=r"spread 0 sqrt\(2\)-steps \(on the grid's edge at width 32, 64, 128: "):
        synthetic_report(tmp_path, monkeypatch, {"adamw": at_top})


def test_wider_minus_narrower_is_paired_by_seed_with_an_interval(tmp_path, monkeypatch):
    settings = TransferSettings(out_dir=str(tmp_path), widths=WIDTHS, head_dim=16, optimizers=["adamw"], lr_points=2,
                                seeds=[0, 1, 2], trainer=["lrm=none"])  # fmt: skip
    runs = plan(settings)
    # Each seed has its own level (the data order), and each doubling of width lowers the loss by 0.1 +- 0.01.
    finals = {
        (r.labels["width"], r.labels["lr_index"], r.labels["seed"]): r.labels["seed"]
        - (0.1 + 0.01 * (r.labels["seed"] - 1)) * math.log2(r.labels["width"] / 32)
        for r in runs
    }
    finals[128, 1, 2] = math.nan  # a diverged seed drops out of that pair only
    results = [SimpleNamespace(run=r, final=finals[r.labels["width"], r.labels["lr_index"], r.labels["seed"]])
               for r in runs]  # fmt: skip
    monkeypatch.setattr(transfer, "collect", lambda runs: [x for x in results if x.run in runs])
    rows = transfer.paired_rises(runs, "adamw", WIDTHS, [0, 1])
    assert [(r["lr_index"], r["narrower"], r["wider"], r["seeds"]) for r in rows] == [
        (0, 32, 64, 3), (0, 64, 128, 3), (1, 32, 64, 3), (1, 64, 128, 2)]  # fmt: skip
    first = rows[0]
    assert first["rise"] == pytest.approx(-0.1)  # the seeds' levels cancel in the pairs
    assert first["ci95"] == pytest.approx([-0.1 - 4.303 * 0.01 / math.sqrt(3), -0.1 + 4.303 * 0.01 / math.sqrt(3)])
    assert rows[3]["rise"] == pytest.approx(-0.095)  # seeds 0 and 1 only
    assert transfer.paired_rises(runs[:1], "adamw", WIDTHS, [0]) == []  # fewer than two seeds: no interval


def test_the_lean_across_the_grid_and_its_change_with_width_are_paired_by_seed(tmp_path, monkeypatch):
    settings = TransferSettings(out_dir=str(tmp_path), widths=WIDTHS, head_dim=16, optimizers=["adamw"], lr_points=5,
                                seeds=[0, 1, 2], trainer=["lrm=none"])  # fmt: skip
    runs = plan(settings)
    # Loss linear in log2(LR) (half a doubling per grid index): slope 0.1 at width 32, 0 at 64, -0.1 at 128, each
    # seed off by 0.01 x (seed - 1) x width / 32, on top of the seed's own level.
    lean = {32: 0.1, 64: 0.0, 128: -0.1}

    def final(width, index, seed):
        return 5.0 + seed + (lean[width] + 0.01 * (seed - 1) * width / 32) * index / 2

    keys = [(r.labels["width"], r.labels["lr_index"], r.labels["seed"]) for r in runs]
    finals = {key: final(*key) for key in keys}
    finals[128, 4, 2] = math.nan  # a diverged point drops that seed at that width only
    results = [SimpleNamespace(run=r, final=finals[r.labels["width"], r.labels["lr_index"], r.labels["seed"]])
               for r in runs]  # fmt: skip
    monkeypatch.setattr(transfer, "collect", lambda runs: [x for x in results if x.run in runs])
    preference = transfer.lr_preference(runs, "adamw", WIDTHS, 5)
    first, middle, last = preference["per_width"]
    assert (first["width"], first["seeds"], last["width"], last["seeds"]) == (32, 3, 128, 2)
    assert first["slope"] == pytest.approx(0.1) and middle["slope"] == pytest.approx(0.0)
    assert first["ci95"] == pytest.approx([0.1 - 4.303 * 0.01 / math.sqrt(3), 0.1 + 4.303 * 0.01 / math.sqrt(3)])
    assert last["slope"] == pytest.approx(-0.1 - 0.02)  # seeds 0 and 1: -0.14 and -0.1
    up, down = preference["changes"]
    assert (up["narrower"], up["wider"], up["seeds"], down["seeds"]) == (32, 64, 3, 2)
    assert up["change"] == pytest.approx(-0.1)  # the seeds' levels cancel; their lean differs by 0.01 per width/32
    assert up["ci95"] == pytest.approx([-0.1 - 4.303 * 0.01 / math.sqrt(3), -0.1 + 4.303 * 0.01 / math.sqrt(3)])
    assert down["change"] == pytest.approx(-0.1 - 0.01)  # seeds 0, 1: (-0.14 - -0.02), (-0.1 - 0.0)
    text = transfer.preference_text(preference)
    assert "| w32 -> w64 | -0.100 |" in text and "| w128 | -0.120 |" in text
