import json

import pytest

from lrm_train.experiments.coord_check import QUANTITIES, CoordCheckSettings, run
from tests.experiments.micro_analysis import is_png_with_content, micro_trainer


def settings(data_root, out_dir, **extra) -> CoordCheckSettings:
    return CoordCheckSettings(
        out_dir=str(out_dir), widths=[16, 32, 64], layers=1, head_dim=8, steps=2, arms=["none"],
        trainer=micro_trainer(data_root, steps=2, model=False), **extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def healthy(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("coord")
    run(settings(data_root, out))
    return out


def test_report_holds_every_step_quantity_and_width(healthy):
    report = json.loads((healthy / "report.json").read_text())
    assert set(report["rms"]) == {"none/16", "none/32", "none/64"}
    for steps in report["rms"].values():
        assert len(steps) == 2 and all(set(s) == set(QUANTITIES) and all(v > 0 for v in s.values()) for s in steps)
    assert {(r["step"], r["quantity"]) for r in report["slopes"]} == {(s, q) for s in (1, 2) for q in QUANTITIES}
    assert is_png_with_content(healthy / "coord_check_none.png")
    # The embedding output at init is init_std x the embedding multiplier at every width: flat.
    embedding = next(r for r in report["slopes"] if r["quantity"] == "embedding" and r["step"] == 1)
    assert abs(embedding["exponent"]) < 0.1 and not embedding["flagged"]


def test_a_deliberately_broken_multiplier_is_flagged(data_root, healthy, tmp_path):
    run(settings(data_root, tmp_path, break_multiplier="embedding_multiplier"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert "none/embedding" in report["flagged"]
    assert "none/embedding" not in json.loads((healthy / "report.json").read_text())["flagged"]
    broken = next(r for r in report["slopes"] if r["quantity"] == "embedding" and r["step"] == 1)
    assert broken["exponent"] == pytest.approx(1.0, abs=0.05)  # scaled by width/16: slope one
    assert "none/embedding" in (tmp_path / "report.md").read_text()


def test_a_rerun_reuses_finished_runs(data_root, healthy, capsys):
    run(settings(data_root, healthy))
    assert capsys.readouterr().out.count("finished, skipped") == 3


def test_bad_break_multiplier_is_one_error_before_any_run(data_root, tmp_path):
    with pytest.raises(ValueError, match="break_multiplier='hidden_size'"):
        run(settings(data_root, tmp_path, break_multiplier="hidden_size"))
    assert not (tmp_path / "runs").exists()
