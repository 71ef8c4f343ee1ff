import json
import math
from pathlib import Path

import pytest
import torch
from runs import as_args, cli, losses, overrides, records, run_config

from lrm_train.models import FalconH1LM
from lrm_train.optim import ParamClass
from lrm_train.train import loop, open_trainer, train
from lrm_train.train.__main__ import main
from lrm_train.train.callbacks import Callback


def test_metrics_jsonl_and_the_offline_wandb_run_hold_the_trajectories(data_root, tmp_path):
    result = train(run_config(data_root, tmp_path, **{"train.max_steps": 3, "logging.wandb.mode": "offline"}))
    records = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all("loss" in r for r in records)
    last = records[-1]
    expected = [
        "lr",
        "grad_norm",
        "grad_norm_multipliers",
        "tokens_per_s",
        "mfu",
        "skipped_steps",
        "val_loss",
        "lrm/lm_head.lrm_scalar",
        "lrm/layers.0.self_attn.q_proj.lrm_row/mean",
        "lrm/embed_tokens.lrm_col/max",
        "norm/layers.1.feed_forward.down_proj",
        "norm_eff/layers.1.feed_forward.down_proj",
        "abm/matrix@hidden/32x32",  # under a muP parametrization hidden matrices have a group (an LR) of their own
        "abm/matrix/8x32",  # B and C
        "abm/embedding/512x32",
        "abm/lm_head/512x32",
    ]
    for key in expected:
        assert key in last, key
    run_file = next(Path(result.wandb_dir).glob("run-*.wandb"))
    blob = run_file.read_bytes()  # W&B's offline log: the history keys are stored as plain strings
    for key in expected:
        assert key.encode() in blob, key


def test_eval_last_validates_only_at_the_last_scheduled_steps_and_trains_the_same(data_root, tmp_path):
    every = {"train.max_steps": 7, "train.eval_every": 2}
    validated = {}
    for last in (0, 2):
        run_dir = tmp_path / f"last{last}"
        train(run_config(data_root, run_dir, **every, **{"train.eval_last": last}))
        validated[last] = {step: r["val_loss"] for step, r in records(run_dir).items() if "val_loss" in r}
    assert sorted(validated[0]) == [2, 4, 6, 7] and sorted(validated[2]) == [6, 7]
    assert validated[2] == {step: validated[0][step] for step in (6, 7)}  # validation leaves training alone
    assert losses(tmp_path / "last0") == losses(tmp_path / "last2")


def test_clipping_leaves_the_multipliers_out_by_default(data_root, tmp_path):
    for include in (False, True):
        with open_trainer(run_config(data_root, tmp_path, **{"train.clip_multipliers": include})) as trainer:
            clipped = {id(p) for p in trainer.engine.clip_params}
            classes = trainer.components.classes
            for name, p in trainer.components.model.named_parameters():
                is_multiplier = classes[name] is ParamClass.MULTIPLIER
                assert (id(p) in clipped) == (include or not is_multiplier), name


def test_non_finite_steps_are_skipped_counted_and_end_the_run_after_k_in_a_row(data_root, tmp_path, monkeypatch):
    real = FalconH1LM.forward
    calls = {"n": 0}

    def sometimes_nan(self, input_ids, targets=None, z_loss_weight=0.0):
        out = real(self, input_ids, targets, z_loss_weight)
        if not torch.is_grad_enabled():  # the validation loss
            return out
        calls["n"] += 1
        poisoned = calls["n"] in bad_calls
        return out._replace(loss=out.loss * float("nan")) if poisoned else out

    monkeypatch.setattr(FalconH1LM, "forward", sometimes_nan)
    bad_calls = {3}  # the 3rd training micro-batch
    result = train(run_config(data_root, tmp_path / "one", **{"train.max_steps": 5, "train.eval_every": 100}))
    records = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    assert records[-1]["skipped_steps"] == 1 and result.step == 5
    assert all(r["loss"] == r["loss"] for r in records if r["step"] != 3)  # no NaN leaked into the model

    calls["n"], bad_calls = 0, set(range(1, 100))
    with pytest.raises(
        RuntimeError, match="3 non-finite steps in a row .* emergency checkpoint: .*emergency_step_00000003"
    ):
        train(run_config(data_root, tmp_path / "two", **{"train.max_bad_steps": 3}))
    assert (tmp_path / "two" / "checkpoints" / "emergency_step_00000003" / "checkpoint.json").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["train.max_stepz=3"], "unknown config key 'train.max_stepz' (check the spelling; --help lists the keys)"),
        (["train.max_steps=many"], "Value 'many' of type 'str' could not be converted to Integer"),
        (["optim=adagrad"], "Could not find 'optim/adagrad'"),
        (["model.num_attention_heads=3"], "model.num_key_value_heads=2 does not divide model.num_attention_heads=3"),
        (
            ["lrm=none", "lrm.lm_head_rows=true"],
            "lrm.lm_head_rows=true needs a placement other than lrm.placement=none",
        ),
        (["data=local_text"], "data.source is empty"),
        (["+train.max_stepz=10"], "unknown config key 'train.max_stepz'"),
        (["optim=adagrad"], "(options: adamw, muon)"),
        (["train.grad_clip=-1"], "train.grad_clip=-1.0 must be >= 0"),
        (["schedule.warmup_steps=-2"], "schedule.warmup_steps=-2 must be >= 0"),
        (["train.eval_last=-1"], "train.eval_last=-1 must be >= 0"),
        (["logging.wandb.mode=online"], "no W&B API key was found"),
    ],
)
def test_config_errors_fail_before_training_with_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a W&B key
    assert main([*args, f"train.run_dir={tmp_path / 'run'}"]) == 2
    assert not (tmp_path / "run").exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: config: ") and message in err


@pytest.mark.multiprocess
def test_cli_config_error_and_missing_launcher(data_root, tmp_path):
    typo = cli(["train.max_stepz=3", f"train.run_dir={tmp_path / 'typo'}"])
    assert typo.returncode == 2 and typo.stderr.strip().splitlines()[-1].startswith("error: config:")
    assert not (tmp_path / "typo").exists()
    ddp = cli(as_args(overrides(data_root, tmp_path / "ddp", **{"dist.name": "ddp"})))
    assert ddp.returncode == 2 and "dist=ddp needs a launcher" in ddp.stderr.strip().splitlines()[-1]


def test_the_parameter_class_table_is_logged(data_root, tmp_path):
    train(run_config(data_root, tmp_path, **{"train.max_steps": 2, "optim.name": "muon"}))
    log_text = (tmp_path / "train_rank0.log").read_text()
    assert "parameter classes (what the optimizer holds)" in log_text
    assert any(line.startswith("matrix") and "muon" in line for line in log_text.splitlines())
    assert any(line.startswith("multiplier") and "adamw" in line and "0.002" in line for line in log_text.splitlines())
    # The LRs the schedule gives the first step: optim.lr 3e-3 x warmup 1/2, not optim.lr itself.
    assert any(line.startswith("matrix") and " 0.0015 " in line for line in log_text.splitlines())


def _strict_records(path) -> list[dict]:
    def refuse(constant):
        raise AssertionError(f"bare {constant} in metrics.jsonl")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_a_non_finite_loss_is_written_as_null(data_root, tmp_path, monkeypatch):
    real = FalconH1LM.forward

    def nan_at_third(self, input_ids, targets=None, z_loss_weight=0.0):
        out = real(self, input_ids, targets, z_loss_weight)
        if not torch.is_grad_enabled():  # the validation loss
            return out
        nan_at_third.calls += 1
        return out._replace(cross_entropy=out.cross_entropy * float("nan")) if nan_at_third.calls == 3 else out

    nan_at_third.calls = 0
    monkeypatch.setattr(FalconH1LM, "forward", nan_at_third)
    result = train(run_config(data_root, tmp_path, **{"train.max_steps": 4, "train.eval_every": 100}))
    records = _strict_records(result.metrics_file)
    assert records[2]["step"] == 3 and records[2]["loss"] is None and records[2]["skipped_steps"] == 1
    assert records[3]["loss"] is not None and records[3]["skipped_steps"] == 1


def test_a_sequence_longer_than_the_validation_split_fails_before_step_one(data_root, tmp_path, capsys):
    from lrm_train.data import TokenData

    prepared = next(p for p in Path(data_root).iterdir() if (p / "manifest.json").exists())
    val_tokens = TokenData(prepared).splits["val"].num_tokens  # a window needs seq_len + 1 tokens
    args = as_args(overrides(data_root, tmp_path, **{"data.seq_len": val_tokens}))
    assert main(args) == 2
    assert f"data.seq_len={val_tokens} is longer than the validation split" in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_ctrl_c_exits_130_and_says_what_was_kept(data_root, tmp_path, monkeypatch, capsys):
    real_step = loop.Trainer.train_step

    def interrupted_after_six(self):
        if self.state.step == 6:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(loop.Trainer, "train_step", interrupted_after_six)
    assert main(as_args(overrides(data_root, tmp_path))) == 130
    kept = tmp_path / "checkpoints" / "step_00000004"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: interrupted at step 6; kept the checkpoint {kept} (run the same command to resume from it)"
    )


class StepCounter(Callback):
    """A user callback: counts applied steps, reports them, and keeps its count across resume."""

    def __init__(self, report_as: str) -> None:
        self.report_as, self.count = report_as, 0

    def on_step(self, trainer, step) -> None:
        self.count += step.applied
        step.metrics[self.report_as] = self.count

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


def test_a_callback_from_the_config_reports_and_resumes(data_root, tmp_path):
    user = {"+callbacks.counter._target_": "test_loop.StepCounter", "+callbacks.counter.report_as": "applied"}
    train(run_config(data_root, tmp_path, **user, **{"train.stop_at_step": 4}))
    result = train(run_config(data_root, tmp_path, **user))
    assert [r["applied"] for r in _strict_records(result.metrics_file)] == list(range(1, 9))
    with pytest.raises(ValueError, match="callbacks.bad: cannot build it"):
        train(run_config(data_root, tmp_path / "bad", **{"+callbacks.bad._target_": "no.such.Callback"}))


def test_the_batch_ramp_grows_the_batch_and_the_learning_rate_inside_the_loop(data_root, tmp_path):
    from lrm_train.optim import batch_fraction, lr_factor

    ramp = {"train.grad_accum": 4, "train.micro_batch_size": 2, "schedule.batch_ramp_steps": 4, "train.max_steps": 6}
    cfg = run_config(data_root, tmp_path, **ramp)
    records = _strict_records(train(cfg).metrics_file)
    micro_batches = [1, 2, 3, 4, 4, 4]  # ceil(4 x (0.25 + 0.75 step / 4))
    assert [math.ceil(4 * batch_fraction(cfg.schedule, s)) for s in range(6)] == micro_batches
    tokens = [m * 2 * 32 for m in micro_batches]
    assert [r["tokens_seen"] for r in records] == [sum(tokens[: i + 1]) for i in range(6)]
    for step, (record, used) in enumerate(zip(records, micro_batches)):
        assert record["lr"] == pytest.approx(cfg.optim.lr * lr_factor(cfg.schedule, step, 6, used / 4))


@pytest.mark.multiprocess
def test_zero3_counts_parameters_and_flops_of_the_whole_model(data_root, tmp_path):
    def model_line(run_dir) -> str:
        return next(line for line in (run_dir / "train_rank0.log").read_text().splitlines() if "FLOPs/token" in line)

    train(run_config(data_root, tmp_path / "single", **{"train.max_steps": 2}))
    zero3 = cli(
        as_args(overrides(data_root, tmp_path / "zero3", **{"train.max_steps": 2, "dist.name": "zero3"})), nproc=1
    )
    assert zero3.returncode == 0, zero3.stderr[-2000:]
    line = model_line(tmp_path / "zero3").split("INFO ", 1)[1]
    assert line == model_line(tmp_path / "single").split("INFO ", 1)[1]
    assert line.startswith("model: 61,329 parameters")


def test_a_run_shorter_than_its_warmup_trains_and_says_the_warmup_takes_the_whole_run(data_root, tmp_path):
    cfg = run_config(data_root, tmp_path, **{"train.max_steps": 4, "schedule.warmup_steps": 20, "schedule": "constant"})
    assert train(cfg).step == 4
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([cfg.optim.lr * k / 4 for k in (1, 2, 3, 4)])  # up to the full LR at the last step
    assert "schedule.warmup_steps=20 is longer than train.max_steps=4" in (tmp_path / "train_rank0.log").read_text()


def test_a_finished_run_started_again_says_so_and_trains_nothing(data_root, tmp_path):
    cfg = run_config(data_root, tmp_path, **{"train.max_steps": 2, "logging.wandb.mode": "offline"})
    train(cfg)
    metrics, wandb_runs = (tmp_path / "metrics.jsonl").read_bytes(), sorted((tmp_path / "wandb").iterdir())
    result = train(cfg)
    assert result.step == 2 and result.last_checkpoint == tmp_path / "checkpoints" / "step_00000002"
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics and sorted((tmp_path / "wandb").iterdir()) == wandb_runs
    log = (tmp_path / "train_rank0.log").read_text()
    assert f"{tmp_path} already finished at step 2 (train.max_steps=2); nothing to do. To train longer" in log
    assert log.count("done at step 2") == 1


def test_the_readmes_callback_example_runs_as_written_and_logs_at_log_steps(data_root, tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = readme.split("# mycallbacks.py (anywhere on PYTHONPATH)\n", 1)[1].split("```", 1)[0]
    (tmp_path / "mycallbacks.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    extra = {
        "train.log_every": 2,
        "+callbacks.spikes._target_": "mycallbacks.LossSpikeAlarm",
        "+callbacks.spikes.factor": 1.5,
    }
    train(run_config(data_root, tmp_path / "run", **extra))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["spike"]) for r in records] == [(2, 0.0), (4, 0.0), (6, 0.0), (8, 0.0)]
