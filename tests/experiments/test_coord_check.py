import json
from types import SimpleNamespace

import pytest
import torch

from lrm_train.experiments.coord_check import (
    KINDS,
    QUANTITIES,
    RESULT_FILE,
    CoordCheckSettings,
    measured,
    plan,
    run,
    seed_means,
    slopes,
    watch,
)
from lrm_train.experiments.experiment import ExperimentFailed
from lrm_train.models import FalconH1LM, width_family
from tests.experiments.micro_analysis import is_png_with_content, micro_trainer


def settings(data_root, out_dir, **extra) -> CoordCheckSettings:
    values = dict(
        out_dir=str(out_dir), widths=[16, 32, 64], layers=1, head_dim=8, steps=2, optimizers=["adamw"],
        lr_factors=[1.0], arms=["none"], seeds=[0], trainer=micro_trainer(data_root, steps=2, model=False),
    )  # fmt: skip
    return CoordCheckSettings(**{**values, **extra})


@pytest.fixture(scope="module")
def healthy(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("coord")
    run(settings(data_root, out, max_slope=10.0))  # the micro runs are too short to be flat: the bar is not tested here
    return out


def test_report_holds_every_step_quantity_kind_and_width(healthy):
    report = json.loads((healthy / "report.json").read_text())
    measured = report["measured"]["adamw/lr1/none"]
    assert set(measured) == {"16", "32", "64"}
    for steps in measured.values():
        assert len(steps) == 3  # initialization, then after each of the 2 steps
        assert all(set(s) == set(QUANTITIES) for s in steps)
        # muP's readouts start at zero: so do the logits and Mamba's C, and only they.
        assert [q for q in QUANTITIES if steps[0][q]["rms"] == 0] == ["mamba.C", "logits"]
        assert all(s[q]["delta"] == 0 for s in steps[:1] for q in QUANTITIES)  # the change since init, at init
        # Below a zero LM head no gradient flows at step 1: C stays zero until step 2, when it too has moved, and so
        # what the scan takes for C (the conv of zero: its bias, a vector without weight decay) stays put.
        unmoved = [q for q in QUANTITIES if steps[1][q]["rms"] == 0 or steps[1][q]["delta"] == 0]
        assert unmoved == ["mamba.C", "mamba.scan_C"]
        assert all(steps[2][q][k] > 0 for q in QUANTITIES for k in KINDS)
    fitted = {(r["step"], r["quantity"], r["kind"]) for r in report["slopes"]}
    zero = {(0, "logits", "rms"), (0, "mamba.C", "rms"), (1, "mamba.C", "rms"), (1, "mamba.C", "delta")}
    zero.add((1, "mamba.scan_C", "delta"))
    zero |= {(0, q, "delta") for q in QUANTITIES}  # nothing to fit
    assert fitted == {(s, q, k) for s in (0, 1, 2) for q in QUANTITIES for k in KINDS} - zero
    assert {r["checked"] for r in report["slopes"] if r["step"] < 2} == {False}
    assert is_png_with_content(healthy / "coord_check_adamw.png")
    assert is_png_with_content(healthy / "coord_check_adamw_mamba.png")
    # The embedding output at init is init_std x the embedding multiplier at every width: flat.
    embedding = next(r for r in report["slopes"] if r["quantity"] == "embedding" and r["step"] == 0)
    assert abs(embedding["exponent"]) < 0.1 and not embedding["flagged"]
    line = report["verdicts"][0]["line"]
    assert (
        line.startswith("coord check (adamw, mup): max |slope| ")
        and f"over {len(QUANTITIES) * len(KINDS)} quantities, steps 2..2 (bar 10)" in line
    )


def test_a_deliberately_broken_multiplier_fails_the_check(data_root, tmp_path, capsys):
    # The embedding scaled by width/16: its output (and everything after it) has slope one; the bar is met otherwise.
    with pytest.raises(ExperimentFailed, match="coordinate check above the bar 0.9"):
        run(settings(data_root, tmp_path, break_multiplier="embedding_multiplier", max_slope=0.9))
    report = json.loads((tmp_path / "report.json").read_text())
    broken = next(r for r in report["slopes"] if r["quantity"] == "embedding" and r["step"] == 2 and r["kind"] == "rms")
    assert broken["exponent"] == pytest.approx(1.0, abs=0.05) and broken["flagged"]
    assert "adamw/lr1/none/embedding/rms" in report["flagged"]
    assert "coord check (adamw, mup): max |slope| " in capsys.readouterr().out


def test_through_multiplier_means_each_optimizers_own_form(data_root, tmp_path):
    runs = plan(settings(data_root, tmp_path, optimizers=["adamw", "muon"], parametrization="mup_multiplier"))
    assert {(r.labels["optimizer"], r.cfg.model.parametrization.value) for r in runs} == {
        ("adamw", "mup_multiplier_adamw"), ("muon", "mup_multiplier_muon")}  # fmt: skip
    assert {r.cfg.optim.lr for r in plan(settings(data_root, tmp_path, lr=1e-3, lr_factors=[1.0, 4.0]))} == {1e-3, 4e-3}
    seeded = plan(settings(data_root, tmp_path, seeds=[0, 1]))
    assert [(r.labels["width"], r.cfg.train.seed, r.run_dir.name) for r in seeded[:2]] == [
        (16, 0, "adamw_lr1_none_w16"), (16, 1, "adamw_lr1_none_w16_s1")]  # fmt: skip


def test_slopes_are_the_seeds_mean_slope_with_an_interval_over_the_seeds(tmp_path):
    # Seed 0's MLP output falls as width^-1, seed 1's as width^-0.5; the plot shows their mean values.
    check = CoordCheckSettings(out_dir=str(tmp_path), widths=[16, 32, 64], steps=2, seeds=[0, 1], max_slope=0.15)
    runs = []
    for seed, exponent in ((1, -0.5), (0, -1.0)):
        for width in check.widths:
            run_dir = tmp_path / f"w{width}_s{seed}"
            run_dir.mkdir()
            value = width**exponent
            step = {q: {"rms": value, "delta": 2 * value} for q in QUANTITIES}
            (run_dir / RESULT_FILE).write_text(json.dumps({"steps": [step] * 3}))
            labels = dict(optimizer="adamw", lr_factor=1.0, arm="none", width=width, seed=seed)
            runs.append(SimpleNamespace(run_dir=run_dir, labels=labels))
    per_seed = measured(runs)
    assert [steps[0]["mlp"]["rms"] for steps in per_seed["adamw/lr1/none"][16]] == [1 / 16, 1 / 4]  # by seed
    assert seed_means(per_seed)["adamw/lr1/none"][16][0]["mlp"] == {"rms": (1 / 16 + 1 / 4) / 2, "delta": 5 / 16}
    row = next(r for r in slopes(check, per_seed) if (r["step"], r["quantity"], r["kind"]) == (2, "mlp", "delta"))
    assert row["exponent"] == pytest.approx(-0.75) and row["per_seed"] == pytest.approx([-1.0, -0.5])
    # Two seeds 0.5 apart: the interval over them (t with one degree of freedom) is wide and reaches inside the bar.
    assert row["ci95"] == pytest.approx([-0.75 - 12.706 * 0.25, -0.75 + 12.706 * 0.25])
    assert row["flagged"] and not row["confident"]


def test_a_rerun_reuses_finished_runs(data_root, healthy, capsys):
    run(settings(data_root, healthy, max_slope=10.0))
    assert capsys.readouterr().out.count("finished, skipped") == 3
    # Their checkpoints mark them finished; read, never trained on, they leave the optimizer's state out.
    finals = list(healthy.glob("runs/*/checkpoints/step_*"))
    assert len(finals) == 3 and not [f for final in finals for f in final.glob("optimizer*")]


def test_bad_break_multiplier_is_one_error_before_any_run(data_root, tmp_path):
    with pytest.raises(ValueError, match="break_multiplier='hidden_size'"):
        run(settings(data_root, tmp_path, break_multiplier="hidden_size"))
    assert not (tmp_path / "runs").exists()


def test_the_mamba_parts_are_the_mixers_own(tmp_path):
    # Each in_proj section is that matrix applied to the mixer's input, and the gated output is what out_proj maps to
    # the mixer's output: the hooks see what the forward computes, not a copy of it.
    cfg = width_family(64, 1, head_dim=8, d_state=4)
    cfg.zero_init_readouts = False
    model = FalconH1LM(cfg)
    seen: dict[str, torch.Tensor] = {}
    inputs: list[torch.Tensor] = []
    watch(model, lambda quantity, output: seen.__setitem__(quantity, output))
    mixer = model.layers[0].mamba
    mixer.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (2, 8)))
        for name in ("z", "x", "B", "C", "dt"):
            assert torch.allclose(seen[f"mamba.{name}"], mixer.in_proj[name](inputs[0]), atol=1e-6), name
        assert torch.allclose(mixer.out_proj(seen["mamba.gated"]), seen["mamba"], atol=1e-6)
        # The scan's inputs: the conv's first output sees only the first token; dt is positive after softplus.
        b_channel = cfg.mamba_d_ssm  # B's first channel in the conv
        first = mixer.conv1d.weight[b_channel, 0, -1] * seen["mamba.B"][:, 0, 0] + mixer.conv1d.bias[b_channel]
        assert torch.allclose(seen["mamba.scan_B"][:, 0, 0], torch.nn.functional.silu(first), atol=1e-6)
        assert torch.allclose(
            seen["mamba.scan_dt"], torch.nn.functional.softplus(seen["mamba.dt"] + mixer.dt_bias), atol=1e-6
        )
        # Scores: C_t.B_s over d_state within each group, s <= t, in row order (t, then s).
        B, C = (seen[f"mamba.scan_{n}"].unflatten(-1, (cfg.mamba_n_groups, cfg.mamba_d_state)) for n in "BC")
        assert seen["mamba.scores"].shape == (2, cfg.mamba_n_groups, 8 * 9 // 2)
        assert torch.allclose(
            seen["mamba.scores"][1, 0, :3],
            torch.stack([C[1, 0, 0] @ B[1, 0, 0], C[1, 1, 0] @ B[1, 0, 0], C[1, 1, 0] @ B[1, 1, 0]]),
            atol=1e-6,
        )
    assert set(seen) == set(QUANTITIES)
