import json
import math

import pytest

from lrm_train.experiments.analysis import mean_interval
from lrm_train.experiments.clip_exclusion import ClipExclusionSettings, plan, run
from lrm_train.experiments.results import read_metrics
from tests.experiments.micro_analysis import is_png_with_content, micro_trainer

CLIP = 0.01  # below the micro model's gradient norms (about 0.03): every step clips


@pytest.fixture(scope="module")
def ablation(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip_exclusion")
    settings = ClipExclusionSettings(
        out_dir=str(out), seeds=[0, 1], grad_clip=CLIP, early_steps=2, trainer=micro_trainer(data_root, steps=4)
    )
    run(settings)
    return out


def test_the_arms_measure_the_same_gradient_with_and_without_the_multipliers(ablation):
    # Same seed, init and batches. The zero-initialized LM head gives the multipliers no gradient at step 1, so both
    # arms clip step 1 alike and meet step 2 with the same weights: there the arms differ only in what the clipped
    # norm holds.
    for seed in (0, 1):
        excluded = read_metrics(ablation / "runs" / f"excluded_s{seed}")
        included = read_metrics(ablation / "runs" / f"included_s{seed}")
        assert excluded[0]["grad_norm_multipliers"] == included[0]["grad_norm_multipliers"] == 0.0
        assert excluded[0]["grad_norm"] == included[0]["grad_norm"]
        excluded, included = excluded[1], included[1]
        assert excluded["grad_norm_multipliers"] > 0
        assert included["grad_norm_multipliers"] == pytest.approx(excluded["grad_norm_multipliers"], rel=1e-6)
        full = math.hypot(excluded["grad_norm"], excluded["grad_norm_multipliers"])
        assert included["grad_norm"] == pytest.approx(full, rel=1e-5)


def test_the_report_counts_clipped_steps_and_pairs_the_final_losses_by_seed(ablation):
    report = json.loads((ablation / "report.json").read_text())
    for entry in report["runs"]:
        records = read_metrics(ablation / "runs" / f"{entry['arm']}_s{entry['seed']}")
        norms = [r["grad_norm"] for r in records]
        assert entry["early"]["clipped_fraction"] == sum(n > CLIP for n in norms[:2]) / 2 == 1.0
        factors = [min(1.0, CLIP / (n + 1e-6)) for n in norms[2:]]
        assert entry["late"]["matrix_factor"] == pytest.approx(sum(factors) / 2)
        mult = [r["grad_norm_multipliers"] for r in records[:2]]
        full = norms[:2] if entry["arm"] == "included" else [math.hypot(n, m) for n, m in zip(norms, mult)]
        shares = [m**2 / f**2 for m, f in zip(mult, full)]
        assert entry["early"]["multiplier_share"] == pytest.approx(sum(shares) / 2)
        assert entry["final_val_loss"] == [r["val_loss"] for r in records if "val_loss" in r][-1]
    final = {(e["arm"], e["seed"]): e["final_val_loss"] for e in report["runs"]}
    gaps = [final[("included", s)] - final[("excluded", s)] for s in (0, 1)]
    mean, ci95 = mean_interval(gaps)
    assert report["gap"]["per_seed"] == gaps and report["gap"]["mean"] == pytest.approx(mean)
    assert report["gap"]["ci95"] == pytest.approx(ci95)
    assert f"**{mean:+.4f}**" in (ablation / "report.md").read_text()
    assert is_png_with_content(ablation / "clip_exclusion.png")


def test_a_model_without_multipliers_or_late_steps_is_refused_before_any_run(data_root, tmp_path):
    trainer = micro_trainer(data_root, steps=4)
    with pytest.raises(ValueError, match="no multipliers"):
        plan(ClipExclusionSettings(out_dir=str(tmp_path), trainer=[*trainer, "lrm=none"]))
    with pytest.raises(ValueError, match="leaves no late steps"):
        plan(ClipExclusionSettings(out_dir=str(tmp_path), early_steps=4, trainer=trainer))
    with pytest.raises(ValueError, match="2 distinct seeds"):
        ClipExclusionSettings(seeds=[0])
    assert not (tmp_path / "runs").exists()
