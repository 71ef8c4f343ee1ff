import json

import pytest
import torch

from lrm_train.experiments.analysis import power_law_fit
from lrm_train.experiments.width_scaling import (
    FUNCTION_SCALES,
    MATRIX_CLASSES,
    PAPER_EXPONENTS,
    WidthScalingSettings,
    analyse,
    learned_multipliers,
    run,
)
from tests.experiments.micro_analysis import is_png_with_content, micro_trainer


def test_learned_multipliers_pair_each_query_head_with_its_key_head():
    head_dim = 2
    weights = {
        "lm_head.lrm_scalar": torch.tensor([0.5]),
        "layers.0.mamba.in_proj.dt.lrm_row": torch.tensor([2.0, 2.0]),
        "layers.0.mamba.in_proj.dt.lrm_col": torch.tensor([0.25, 0.75]),  # mean 0.5: dt = 2 x 0.5
        "layers.0.self_attn.q_proj.lrm_row": torch.tensor([1.0, 1.0, 4.0, 4.0, 2.0, 2.0, 8.0, 8.0]),  # 4 q heads
        "layers.0.self_attn.k_proj.lrm_row": torch.tensor([1.0, 1.0, 0.5, 0.5]),  # 2 kv heads, 2 q heads each
    }
    values = learned_multipliers(weights, head_dim, heads_per_kv=2)
    assert values["lm_head_scalar"] == 0.5
    assert values["ssm_dt"] == pytest.approx(1.0)
    assert values["qk_product"] == pytest.approx((1 * 4 * 1 * 4) ** 0.25)  # q x k per head: 1, 4, 1, 4


def test_scalar_multipliers_give_every_head_the_product_of_the_q_and_k_scalars():
    weights = {
        "lm_head.lrm_scalar": torch.tensor([0.25]),
        "layers.0.mamba.in_proj.dt.lrm_scalar": torch.tensor([0.5]),
        "layers.1.mamba.in_proj.dt.lrm_scalar": torch.tensor([2.0]),  # layers: geometric mean 1
        "layers.0.self_attn.q_proj.weight": torch.zeros(4, 3),  # 2 heads of 2
        "layers.0.self_attn.q_proj.lrm_scalar": torch.tensor([3.0]),
        "layers.0.self_attn.k_proj.lrm_scalar": torch.tensor([-0.5]),  # a sign is a symmetry: magnitudes
        "layers.1.self_attn.q_proj.weight": torch.zeros(4, 3),
        "layers.1.self_attn.q_proj.lrm_scalar": torch.tensor([0.75]),
        "layers.1.self_attn.k_proj.lrm_scalar": torch.tensor([2.0]),
    }
    values = learned_multipliers(weights, head_dim=2, heads_per_kv=1)
    assert values == pytest.approx(dict(lm_head_scalar=0.25, ssm_dt=1.0, qk_product=1.5))


def test_width_sweep_report(data_root, tmp_path):
    widths = [16, 32, 64]
    settings = WidthScalingSettings(
        out_dir=str(tmp_path), widths=widths, layers=1, head_dim=8, seeds=[0], control_seeds=[0], force=True,
        trainer=micro_trainer(data_root, model=False),
    )  # fmt: skip
    run(settings)
    report = json.loads((tmp_path / "report.json").read_text())
    learned = {r["width"]: r["learned"] for r in report["runs"] if r["arm"] == "lrm"}
    for quantity, paper in PAPER_EXPONENTS.items():
        fit = power_law_fit(widths, [learned[w][quantity] for w in widths])  # one seed: the fit and its interval
        assert report["exponents"][quantity]["exponent"] == pytest.approx(fit["exponent"])
        assert report["exponents"][quantity]["ci95"] == pytest.approx(fit["ci95"])
        assert report["paper_exponents"][quantity] == paper
        assert f"| {quantity} | {fit['exponent']:.4g} |" in (tmp_path / "report.md").read_text()
    # Two steps at lr 3e-3 from 1: the multipliers have moved, but little.
    assert all(0.9 < learned[w]["lm_head_scalar"] < 1.1 for w in widths)
    assert learned[16]["lm_head_scalar"] != 1.0
    # The control has no multipliers; both arms have their matrix norms and logits fitted against width.
    fitted = {(f["arm"], f["quantity"]) for f in [*report["matrix_norms"], *report["function_scales"]]}
    assert {("lrm", "hidden"), ("control", "lm_head"), ("lrm", "logits"), ("control", "dt pre-activation")} <= fitted
    assert all("learned" not in r for r in report["runs"] if r["arm"] == "control")
    assert is_png_with_content(tmp_path / "width_scaling.png")


def test_exponents_are_fitted_per_seed_and_averaged_over_the_seeds():
    widths = [32, 64, 128]
    settings = WidthScalingSettings(widths=widths, seeds=[0, 1])
    results = []
    for seed, head in ((0, -0.9), (1, -1.1)):  # two seeds' own d^-0.9 and d^-1.1
        for w in widths:
            learned = dict(lm_head_scalar=w**head, ssm_dt=w**-1.0, qk_product=w**-2.0)
            scales = dict(matrix_norm={c: 0.07 for c in MATRIX_CLASSES}, function={f: w**0.0 for f in FUNCTION_SCALES})
            results.append(dict(arm="lrm", width=w, seed=seed, learned=learned, **scales))
    results += [
        dict(arm="control", width=w, seed=0, matrix_norm={c: 0.07 for c in MATRIX_CLASSES},
             function={f: 0.1 * w for f in FUNCTION_SCALES})
        for w in widths
    ]  # fmt: skip
    found = analyse(settings, results)
    head = found["exponents"]["lm_head_scalar"]
    assert head["exponent"] == pytest.approx(-1.0) and head["per_seed"] == pytest.approx([-0.9, -1.1])
    assert head["ci95"] == pytest.approx([-1.0 - 12.706 * 0.1, -1.0 + 12.706 * 0.1])  # t, 1 degree of freedom
    assert head["interval"] == "over seeds (t)"
    assert found["exponents"]["qk_product"]["exponent"] == pytest.approx(-2.0)
    scales = {(f["arm"], f["quantity"]): f for f in found["function_scales"]}
    assert scales[("control", "logits")]["exponent"] == pytest.approx(1.0)
    assert scales[("control", "logits")]["interval"] == "regression (one seed)"
    assert scales[("lrm", "logits")]["exponent"] == pytest.approx(0.0, abs=1e-12)
