import json
import math

import pytest

from lrm_train.experiments.abm import ABMSettings, main, run
from lrm_train.train import train
from tests.experiments.micro_analysis import is_png_with_content
from tests.runs import run_config


@pytest.fixture(scope="module")
def micro_run(data_root, tmp_path_factory):
    """A finished micro run whose metrics carry the trainer's own ABM values."""
    return train(run_config(data_root, tmp_path_factory.mktemp("run"))).run_dir


def test_adamw_equilibrium_slope_is_one_half_and_matches_the_closed_form(micro_run, tmp_path):
    settings = ABMSettings(
        out_dir=str(tmp_path), optimizers=["adamw"], ratios=[1e-2, 1e-1, 1.0], products=[2e-2, 4e-2], run=str(micro_run)
    )
    run(settings)
    report = json.loads((tmp_path / "report.json").read_text())
    assert {f["shadow"].split("/")[0] for f in report["slopes"]} == {"matrix@hidden", "matrix", "embedding", "lm_head"}
    for fit in report["slopes"]:
        assert fit["exponent"] == pytest.approx(0.5, abs=0.05)
        assert fit["within_range"]
    for point in report["points"]:
        closed = point["closed_form_adamw"]  # per shadow: tiny is a muP transfer from width 1024 to 128, so its
        nominal = math.sqrt(point["lr"] / (2 * point["wd"]))  # hidden group's lr is x 8 and its wd / 8
        assert closed["matrix/16x128"] == pytest.approx(nominal) and closed["embedding/8192x128"] == pytest.approx(
            nominal
        )
        assert closed["matrix@hidden/128x128"] == pytest.approx(8 * nominal)
        for shadow, value in point["equilibrium"].items():
            assert value == pytest.approx(closed[shadow], rel=0.15)
    for name in ("abm_equilibrium.png", "abm_trajectories_adamw.png", "abm_run_overlay.png"):
        assert is_png_with_content(tmp_path / name)
    markdown = (tmp_path / "report.md").read_text()
    first = report["slopes"][0]
    assert f"| adamw | {first['shadow']} | {first['exponent']:.4g} |" in markdown
    assert report["run_overlay"]["step"] == 8 and report["run_overlay"]["norm_over_abm_mean"]


def test_muon_slope_is_one_half(tmp_path):
    run(ABMSettings(out_dir=str(tmp_path), optimizers=["muon"], ratios=[1e-2, 1.0], products=[4e-2, 8e-2]))
    fits = json.loads((tmp_path / "report.json").read_text())["slopes"]
    assert any(f["shadow"].startswith("matrix/") for f in fits)
    assert all(f["exponent"] == pytest.approx(0.5, abs=0.05) for f in fits)


def test_a_slope_outside_the_range_fails_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("lrm_train.experiments.abm.SLOPE_RANGE", (0.6, 0.7))
    args = [f"out_dir={tmp_path}", "optimizers=[adamw]", "ratios=[1e-2,1.0]", "products=[4e-2,8e-2]"]
    assert main(args) == 1
    assert (tmp_path / "report.md").is_file()  # the report says what failed
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ABM slope outside 0.6-0.7: adamw ") and line.endswith(f"(see {tmp_path}/report.md)")


def test_bad_input_is_one_line_before_any_work(tmp_path, capsys):
    assert main([f"out_dir={tmp_path}/out", "optimizers=[sgd]"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()
    assert main([f"out_dir={tmp_path}/out", f"run={tmp_path}"]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
