import json
import math

import pytest

from lrm_train.experiments.transfer import TRANSFER, TransferSettings, main, plan
from tests.experiments.micro_analysis import is_png_with_content, micro_trainer

WIDTHS = [32, 64, 128]


def hydra_list(values: list[str]) -> str:
    return "[" + ",".join(f"'{v}'" for v in values) + "]"


def micro_args(data_root, out_dir, **extra) -> list[str]:
    """A micro sweep: widths 32..128 (heads of 16), 2 steps per run, the micro trainer."""
    values = dict(out_dir=out_dir, widths="[32,64,128]", head_dim=16, steps=2)
    values.update(trainer=hydra_list(["lrm=none", *micro_trainer(data_root, steps=2, model=False)]), **extra)
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
        (dict(lr=0.0), "lr=0.0 must be > 0"),
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


def test_the_default_config_sweeps_five_lrs_at_three_widths_into_a_folder_per_parametrization():
    settings, runs = TRANSFER.compose(["parametrization=standard"])
    assert settings.out_dir == "experiments/transfer/standard"
    assert len(runs) == 2 * 3 * 5
    assert sorted({r.cfg.model.hidden_size for r in runs}) == [64, 128, 256]


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("mup", {"adamw": "mup", "muon": "mup"}),
        ("standard", {"adamw": "standard", "muon": "standard"}),
        ("mup_multiplier", {"adamw": "mup_multiplier_adamw", "muon": "mup_multiplier_muon"}),
    ],
)
def test_the_plan_holds_every_optimizer_width_and_lr(data_root, tmp_path, setting, expected):
    settings = TransferSettings(
        out_dir=str(tmp_path), widths=WIDTHS, head_dim=16, lr=2e-3, steps=3, parametrization=setting,
        trainer=micro_trainer(data_root, steps=3, model=False),
    )  # fmt: skip
    runs = plan(settings)
    assert len(runs) == 2 * 3 * 5
    assert {(r.labels["optimizer"], r.labels["width"], r.labels["lr_index"]) for r in runs} == {
        (o, w, i) for o in ("adamw", "muon") for w in WIDTHS for i in range(5)
    }
    for run in runs:
        k = run.labels["lr_index"] - 2
        assert run.labels["lr"] == pytest.approx(2e-3 * 2 ** (k / 2))
        assert run.cfg.optim.lr == run.labels["lr"] and run.cfg.optim.name == run.labels["optimizer"]
        assert run.cfg.model.parametrization == expected[run.labels["optimizer"]] == run.labels["parametrization"]
        assert run.cfg.model.hidden_size == run.labels["width"]
        assert (run.cfg.train.max_steps, run.cfg.train.eval_every, run.cfg.train.ckpt_every) == (3, 3, 3)
    assert len({r.run_dir for r in runs}) == len(runs)


def test_an_lr_optimum_within_one_step_across_widths_passes(data_root, tmp_path, monkeypatch, capsys):
    both = bowl({32: 1, 64: 2, 128: 2}, LOWER_WITH_WIDTH)
    fake_losses(monkeypatch, {"adamw": both, "muon": both})
    assert main(micro_args(data_root, tmp_path, lr=4e-3, report="only")) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-3:-1] == [
        "LR transfer (adamw): best LR per width {32: 0.00283, 64: 0.004, 128: 0.004}; spread 1 sqrt(2)-steps",
        "LR transfer (muon): best LR per width {32: 0.00283, 64: 0.004, 128: 0.004}; spread 1 sqrt(2)-steps",
    ]
    assert "Wider is better (adamw): holds at LR 0.00283, 0.004, 0.00566 (no loss rise over 0.02 with width)" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["results"]["adamw"]["best_index"] == {"32": 1, "64": 2, "128": 2}
    assert report["results"]["adamw"]["spread"] == 1 and report["results"]["adamw"]["at_grid_edge"] == []
    assert report["lr_grid"] == pytest.approx([4e-3 * 2 ** (k / 2) for k in range(-2, 3)])
    assert is_png_with_content(tmp_path / "transfer_adamw.png") and is_png_with_content(tmp_path / "transfer_muon.png")


def test_an_lr_optimum_that_drifts_two_steps_fails_the_command(data_root, tmp_path, monkeypatch, capsys):
    fake_losses(
        monkeypatch, {"adamw": bowl({32: 1, 64: 2, 128: 2}, LOWER_WITH_WIDTH), "muon": bowl({32: 0, 64: 1, 128: 2}, LOWER_WITH_WIDTH)}
    )  # fmt: skip
    assert main(micro_args(data_root, tmp_path, lr=4e-3, report="only")) == 1
    captured = capsys.readouterr()
    assert "LR transfer (muon): best LR per width {32: 0.002, 64: 0.00283, 128: 0.004}; spread 2 sqrt(2)-steps" in (
        captured.out
    )
    [line] = captured.err.strip().splitlines()
    assert line.startswith("error: LR transfer (muon): ") and line.endswith(f"(see {tmp_path}/report.md)")
    assert "adamw" not in line
    assert json.loads((tmp_path / "report.json").read_text())["results"]["muon"]["transfers"] is False


def test_a_wider_model_worse_beyond_the_tolerance_fails_and_within_it_passes(data_root, tmp_path, monkeypatch, capsys):
    worse = bowl({w: 2 for w in WIDTHS}, {32: 0.0, 64: 0.01, 128: 0.05})  # 64 -> 128: +0.04 at every LR
    fake_losses(monkeypatch, {"adamw": worse})
    assert main(micro_args(data_root, tmp_path, optimizers="[adamw]", report="only")) == 1
    err = capsys.readouterr().err
    assert "Wider is better (adamw): 3 violations beyond 0.02: w64->w128 at LR " in err and "+0.040" in err
    assert main(micro_args(data_root, tmp_path, optimizers="[adamw]", report="only", loss_tolerance=0.05)) == 0


def test_a_diverged_run_is_no_best_lr_and_a_wider_divergence_near_the_optimum_is_a_violation(
    data_root, tmp_path, monkeypatch, capsys
):
    losses = bowl({w: 3 for w in WIDTHS}, LOWER_WITH_WIDTH)
    losses[32][3] = None  # the narrowest diverges at the others' best LR: its best is the next finite one
    losses[128][4] = None  # the widest diverges next to its optimum
    fake_losses(monkeypatch, {"adamw": losses})
    assert main(micro_args(data_root, tmp_path, optimizers="[adamw]", report="only")) == 1
    out = capsys.readouterr().out
    assert "LR transfer (adamw): best LR per width {32: 0.003, 64: 0.00424, 128: 0.00424}; spread 1" in out
    assert "w64->w128 at LR 0.006 diverged" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["final_loss"]["adamw"]["128"][4] is None
    assert "| 128 |" in (tmp_path / "report.md").read_text()


def test_a_micro_sweep_trains_and_reports(data_root, tmp_path, capsys):
    args = micro_args(data_root, tmp_path, optimizers="[adamw]", lr_points=2, loss_tolerance=100)
    assert main([*args, "parametrization=mup_multiplier"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    finals = report["final_loss"]["adamw"]
    assert set(finals) == {"32", "64", "128"} and all(math.isfinite(v) for f in finals.values() for v in f)
    assert report["results"]["adamw"]["spread"] <= 1
    assert is_png_with_content(tmp_path / "transfer_adamw.png")
    assert "## adamw (mup_multiplier_adamw)" in (tmp_path / "report.md").read_text()
    assert "LR transfer (adamw): best LR per width {32: " in capsys.readouterr().out
