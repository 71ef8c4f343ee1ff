import json
import math

import pytest
import torch
import yaml

from lrm_train.config_compose import compose_schema
from lrm_train.experiments import norm_sweep
from lrm_train.experiments.analysis import final_weights
from lrm_train.experiments.norm_sweep import NormSweepSettings, final_values, plan, run
from tests.experiments.micro_analysis import is_png_with_content, micro_trainer

SCALES = [0.125, 8.0]


@pytest.fixture(scope="module")
def swept(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("norm_sweep")
    arms = {"frozen": ["lrm=none", "optim.norm.lr_mult=0"], "scalar": ["lrm=scalar", "optim.norm.lr_mult=0"]}
    run(
        NormSweepSettings(
            out_dir=str(out), scales=SCALES, effective_lr=0.1, arms=arms, trainer=micro_trainer(data_root), force=True
        )
    )
    return out


def test_head_lr_and_wd_follow_s_at_a_fixed_product(swept):
    for scale in SCALES:
        optim = yaml.safe_load((swept / "runs" / f"frozen_S{scale:g}" / "config.yaml").read_text())["optim"]
        lr = optim["lr"] * optim["lm_head"]["lr_mult"]
        wd = optim["weight_decay"] * optim["lm_head"]["wd_mult"]
        assert (lr * wd) ** 0.5 == pytest.approx(0.1) and (lr / wd) ** 0.5 == pytest.approx(scale)


def test_frozen_norm_weights_stay_at_one(swept):
    weights = final_weights(swept / "runs" / "frozen_S8")
    norms = [k for k in weights if k.endswith("layernorm.weight")]
    assert norms and all(torch.equal(weights[k], torch.ones_like(weights[k])) for k in norms)
    assert not torch.equal(weights["lm_head.weight"], final_weights(swept / "runs" / "frozen_S0.125")["lm_head.weight"])


def test_report_numbers_equal_the_runs_metrics(swept):
    report = json.loads((swept / "report.json").read_text())
    assert len(report["runs"]) == 4
    for entry in report["runs"]:
        measured = final_values(swept / "runs" / f"{entry['arm']}_S{entry['S']:g}")
        assert entry["val_loss"] == measured["val_loss"] and entry["norm"] == measured["norm"]
    for arm in ("frozen", "scalar"):
        losses = [e["val_loss"] for e in report["runs"] if e["arm"] == arm]
        assert report["spread"][arm]["spread"] == pytest.approx(max(losses) - min(losses))
        assert f"| {arm} | {min(losses):.4g} | {max(losses):.4g} |" in (swept / "report.md").read_text()
    assert all("head_scalar" in e for e in report["runs"] if e["arm"] == "scalar")
    assert is_png_with_content(swept / "norm_sweep.png")


def test_a_bad_arm_override_fails_before_any_run(data_root, tmp_path):
    settings = NormSweepSettings(out_dir=str(tmp_path), arms={"x": ["lrm=nonsense"]}, trainer=micro_trainer(data_root))
    with pytest.raises(ValueError, match="lrm"):
        run(settings)
    assert not (tmp_path / "runs").exists()


def test_the_gpu_sweep_compiles_its_decoder_layers(tmp_path):
    settings = compose_schema("norm_sweep", NormSweepSettings, ["experiment=norm_sweep_gpu", f"out_dir={tmp_path}"])
    assert all(run.cfg.train.compile for run in plan(settings))


def test_report_fits_the_slopes_of_fabricated_finished_runs(tmp_path, monkeypatch):
    """The report's slopes, loss excesses and overlay from made-up final values with known powers of S."""
    settings = NormSweepSettings(
        out_dir=str(tmp_path), scales=[0.25, 1.0, 4.0], end_seeds={"frozen": [1]}, force=True,
        arms={"frozen": ["lrm=none", "optim.norm.lr_mult=0"], "scalar": ["lrm=scalar", "optim.norm.lr_mult=0"]},
    )  # fmt: skip
    runs = plan(settings)
    offset = {0: -0.01, 1: 0.01}  # seed 1 a little worse than seed 0 at both ends: seed std 0.01 * sqrt(2)

    def fabricated(run):
        scale, seed = run.labels["S"], run.labels["seed"]
        if run.labels["arm"] == "frozen":  # the logits' scale follows S; the loss is lowest at S = 1
            return dict(val_loss=4.0 + 0.1 * math.log(scale) ** 2 + offset[seed] * (scale != 1), norm=0.7 * scale**0.5,
                        norm_eff=0.2 * scale**0.5, final_norm_rms=1.0)  # fmt: skip
        return dict(val_loss=4.0, norm=0.7 * scale, norm_eff=0.2, final_norm_rms=1.0, head_scalar=1 / scale)

    by_dir = {run.run_dir: fabricated(run) for run in runs}
    monkeypatch.setattr(norm_sweep, "finished", lambda runs: runs)
    monkeypatch.setattr(norm_sweep, "final_values", lambda run_dir: by_dir[run_dir])
    trajectory = [{"step": s, "norm/lm_head": 0.01 * s, "abm/lm_head/2048x64": 0.011 * s} for s in (10, 20)]
    monkeypatch.setattr(norm_sweep, "read_metrics", lambda run_dir: trajectory)
    norm_sweep.report(settings, runs)

    report = json.loads((tmp_path / "report.json").read_text())
    slopes = {(f["arm"], f["quantity"]): f for f in report["slopes"]}
    assert slopes[("frozen", "norm")]["exponent"] == pytest.approx(0.5)
    assert slopes[("frozen", "norm")]["n"] == 5  # every S and both seeds at the ends
    assert slopes[("scalar", "norm")]["exponent"] == pytest.approx(1.0)
    assert slopes[("scalar", "norm_eff")]["exponent"] == pytest.approx(0.0, abs=1e-12)
    assert slopes[("scalar", "head_scalar")]["exponent"] == pytest.approx(-1.0)
    assert ("frozen", "head_scalar") not in slopes and ("frozen", "final_norm_rms") not in slopes
    frozen_ends = report["ends"][0]
    assert frozen_ends["best_S"] == 1.0 and frozen_ends["seed_std"] == pytest.approx(0.01 * math.sqrt(2))
    assert frozen_ends["excess"]["4.0"] == pytest.approx(0.1 * math.log(4) ** 2)
    assert report["ends"][1]["seed_std"] is None  # the scalar arm has one seed at every S
    text = (tmp_path / "report.md").read_text()
    assert "| scalar | learned head scalar | -1 |" in text and "| frozen | ‖W‖ of the head | 0.5 |" in text
    assert len(report["preflight"]) == 8 + 3  # the head of each of the 8 runs; the scalar arm's head scalar
    assert is_png_with_content(tmp_path / "norm_sweep_abm_overlay.png")
