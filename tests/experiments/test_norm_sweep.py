import json

import pytest
import torch
import yaml

from lrm_train.config_compose import compose_schema
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
            out_dir=str(out), scales=SCALES, effective_lr=0.1, arms=arms, trainer=micro_trainer(data_root)
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
