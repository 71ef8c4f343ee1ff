import pytest

from lrm_train.config_compose import compose_schema
from lrm_train.experiments import norm_sweep, width_scaling
from lrm_train.experiments.norm_sweep import NormSweepSettings
from lrm_train.experiments.preflight import EQUILIBRIUM, TRAVEL, budgets, refuse_short, summed_lr
from lrm_train.experiments.runner import make_run
from tests.runs import MICRO_MODEL

# A schedule to sum by hand: lr 0.1, warmup 4 steps, then constant, 10 steps: 0.1 x (1/4 + 2/4 + 3/4 + 1 + 6 x 1).
HAND_SCHEDULE = ["optim.lr=0.1", "schedule=constant", "schedule.warmup_steps=4", "train.max_steps=10"]
HAND_SUM = 0.1 * 8.5


def hand_run(tmp_path, *overrides):
    model = [f"model.{k}={v}" for k, v in MICRO_MODEL.items()]
    return make_run("hand", tmp_path / "run", [*model, *HAND_SCHEDULE, *overrides])


def test_budgets_on_a_hand_computable_schedule(tmp_path):
    run = hand_run(
        tmp_path,
        "lrm=scalar",
        "optim.weight_decay=0.5",
        "optim.lm_head.lr_mult=2",
        "optim.lm_head.wd_mult=3",
        "optim.multiplier_weight_decay=0",
        "optim.roles=[{pattern: lm_head, multipliers: true, lr_mult: 10}]",
    )
    assert summed_lr(run) == pytest.approx(HAND_SUM)
    rows = budgets(run, ["lm_head.weight", "*proj*.weight"], {"lm_head.lrm_scalar": 4.0, "*q_proj.lrm_scalar": 1.0})
    found = {(b.group, b.kind): b for b in rows}
    head = found[("lm_head", EQUILIBRIUM)]
    assert head.value == pytest.approx(HAND_SUM * 2 * 0.5 * 3) and head.needed == 1 and not head.short
    matrices = found[("matrix", EQUILIBRIUM)]
    assert matrices.value == pytest.approx(HAND_SUM * 0.5) and matrices.short
    head_scalar = found[("multiplier/lm_head", TRAVEL)]  # its role's LR, 10x the class's
    assert head_scalar.value == pytest.approx(HAND_SUM * 10) and head_scalar.needed == 4.0 and not head_scalar.short
    q_scalars = found[("multiplier", TRAVEL)]
    assert q_scalars.value == pytest.approx(HAND_SUM) and q_scalars.needed == 1.0 and q_scalars.short
    assert "layers.0.self_attn.q_proj.lrm_scalar and 1 more" == q_scalars.parameters


def test_refusal_names_the_run_and_its_numbers_unless_forced(tmp_path):
    rows = budgets(hand_run(tmp_path), ["lm_head.weight"], {})
    with pytest.raises(ValueError) as refused:
        refuse_short(rows, force=False)
    line = str(refused.value)
    assert "\n" not in line and "run hand: lm_head.weight" in line
    assert f"{HAND_SUM * 0.1:.3g} < 1" in line  # default wd 0.1
    refuse_short(rows, force=True)


def test_a_pattern_that_names_nothing_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="'nothing.here' names no parameter"):
        budgets(hand_run(tmp_path), ["nothing.here"], {})


def test_norm_sweep_refuses_a_head_that_cannot_equilibrate(tmp_path):
    # sqrt(lr*wd) = 0.01: 1e-4 per step of the 350-step default is 0.03 equilibration times.
    settings = compose_schema(
        "norm_sweep", NormSweepSettings, [f"out_dir={tmp_path / 'out'}", "effective_lr=0.01", "scales=[0.25,1,4]"]
    )
    settings.arms, settings.end_seeds = {"frozen": ["lrm=none"]}, {}
    with pytest.raises(ValueError) as refused:
        norm_sweep.plan(settings)
    line = str(refused.value)
    assert "\n" not in line and "pre-flight: run norm_sweep_frozen_S0.25: lm_head.weight" in line
    assert "0.0306 < 1" in line
    settings.force = True
    assert len(norm_sweep.plan(settings)) == 3


def test_width_scaling_refuses_multipliers_that_cannot_travel_the_width_change(tmp_path, capsys):
    # Multipliers at a tenth of the LR: 0.49 of travel, short of 1 - 32/64 = 0.5 already at width 64.
    multipliers = "multipliers=['lrm=scalar','lrm.init=one','optim.multiplier.lr_mult=0.1']"
    argv = [f"out_dir={tmp_path / 'out'}", multipliers, "seeds=[0]", "control_seeds=[]"]
    assert width_scaling.main(argv) == 2  # the bad-input status, before any work
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run width_w64: embed_tokens.lrm_scalar and 27 more" in err
    assert "travel budget Σlr = 0.491 < 0.5" in err
    assert not (tmp_path / "out").exists()
    assert width_scaling.main([*argv, "force=true", "--estimate"]) == 0


def test_a_head_scalar_started_at_the_mup_value_needs_that_value_times_the_change(tmp_path):
    # lrm.init=mup: the scalar starts at the head's muP multiplier, 0.0390625 x 1024/64 at width 64 under muP.
    run = make_run("mup", tmp_path / "run", ["lrm=scalar", "lrm.init=mup", "model.hidden_size=64"], S=2.0)
    m0 = 0.0390625 * 1024 / 64
    [head] = [b for b in norm_sweep.preflight([run]) if b.parameters == "lm_head.lrm_scalar"]
    assert head.needed == pytest.approx(abs(m0 / 2 - m0))
