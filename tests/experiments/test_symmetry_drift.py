import json
import math

import pytest
import torch

from lrm_train.experiments.results import read_metrics
from lrm_train.experiments.symmetry_drift import (
    SymmetryDriftSettings,
    drift_series,
    equilibration_times,
    plan,
    qk_imbalance,
    run,
    symmetry_coordinates,
)
from tests.experiments.micro_analysis import is_png_with_content, micro_trainer


def record(row_mean, row_std, col_mean, col_std, norm, step=1) -> dict:
    m = "lrm/layers.0.mamba.out_proj"
    return {
        "step": step,
        f"{m}.lrm_row/mean": row_mean,
        f"{m}.lrm_row/std": row_std,
        f"{m}.lrm_col/mean": col_mean,
        f"{m}.lrm_col/std": col_std,
        "norm/layers.0.mamba.out_proj": norm,
        "lrm/lm_head.lrm_scalar": 3.0,  # a scalar alone has no row/col pair
        "loss": 1.0,
    }


def test_the_symmetry_coordinates_are_log_ratios_of_rms():
    # Rows: RMS 2. Columns: mean 1 and (uncorrected) std 1, RMS sqrt(2). Matrix RMS 0.5.
    coords = symmetry_coordinates(record(2.0, 0.0, 1.0, 1.0, 0.5))
    assert list(coords) == ["layers.0.mamba.out_proj"]
    row_col, mult_matrix = coords["layers.0.mamba.out_proj"]
    assert row_col == pytest.approx(math.log(2 / math.sqrt(2)))
    assert mult_matrix == pytest.approx(math.log(2 * math.sqrt(2) / 0.5))
    assert symmetry_coordinates(record(2.0, 0.0, 1.0, 1.0, 0.0)) == {}  # a zero-initialized readout, not yet updated


def test_the_drift_is_measured_from_the_first_logged_step():
    records = [
        record(1.0, 0.0, 1.0, 0.0, 1.0, step=5),
        {"step": 7, "val_loss": 2.0},
        record(4.0, 0.0, 1.0, 0.0, 2.0, 10),
    ]
    drift = drift_series(records)
    assert drift["steps"] == [5, 10]
    assert drift["row_col"] == pytest.approx([0.0, math.log(4)])
    assert drift["mult_matrix"] == pytest.approx([0.0, math.log(4) - math.log(2)])


def test_qk_imbalance_pairs_each_query_head_with_its_key_head():
    weights = {
        "layers.0.self_attn.q_proj.lrm_row": torch.tensor([2.0, 2.0, 1.0, 1.0]),  # 2 query heads of 2 dimensions
        "layers.0.self_attn.k_proj.lrm_row": torch.tensor([1.0, 1.0]),  # one key head shared by both
    }
    assert qk_imbalance(weights, head_dim=2, heads_per_kv=2) == pytest.approx(math.log(2))


@pytest.fixture(scope="module")
def drifted(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("symmetry_drift")
    trainer = [*micro_trainer(data_root, steps=4), "train.log_every=1", "schedule=constant"]
    settings = SymmetryDriftSettings(out_dir=str(out), multiplier_weight_decays=[0.0, 0.5], seeds=[0], trainer=trainer)
    run(settings)
    return out, plan(settings)


def test_the_report_holds_each_runs_drift_and_the_decay_it_reached(drifted):
    out, runs = drifted
    report = json.loads((out / "report.json").read_text())
    assert len(report["runs"]) == 4 and set(report["arms"]) == {
        "wd0_float32",
        "wd0_bf16",
        "wd0.5_float32",
        "wd0.5_bf16",
    }
    for spec, entry in zip(runs, report["runs"]):
        drift = drift_series(read_metrics(spec.run_dir))
        assert entry["row_col_final"] == drift["row_col"][-1] and entry["steps"] == [1, 2, 3, 4]
        assert entry["skipped_steps"] == 0 and not entry["diverged"]
        # Constant LR (warmup 1): wd x lr x 4 steps.
        lr = spec.cfg.optim.lr * spec.cfg.optim.multiplier.lr_mult
        assert entry["equilibration_times"] == pytest.approx(entry["wd"] * lr * 4)
        assert equilibration_times(spec) == entry["equilibration_times"]
    by_arm = {(e["wd"], e["precision"]): e for e in report["runs"]}
    # bf16 autocast changes the numbers: the precision is really applied.
    assert by_arm[(0.0, "bf16")]["final_val_loss"] != by_arm[(0.0, "float32")]["final_val_loss"]
    assert report["arms"]["wd0_bf16"]["row_col_final"] == by_arm[(0.0, "bf16")]["row_col_final"]
    assert is_png_with_content(out / "symmetry_drift.png")


def test_bad_settings_are_refused_before_any_run(data_root, tmp_path):
    with pytest.raises(ValueError, match="precisions"):
        SymmetryDriftSettings(precisions=["fp8"])
    with pytest.raises(ValueError, match="multiplier_weight_decays"):
        SymmetryDriftSettings(multiplier_weight_decays=[-1.0])
    with pytest.raises(ValueError, match="lrm=full"):
        plan(SymmetryDriftSettings(out_dir=str(tmp_path), trainer=[*micro_trainer(data_root), "lrm=scalar"]))
    assert not (tmp_path / "runs").exists()
