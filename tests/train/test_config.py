import re

import pytest
import torch
from omegaconf import OmegaConf
from runs import as_args, cli, losses, overrides

from lrm_train.distributed import EngineName
from lrm_train.models import KernelBackend
from lrm_train.optim import ScheduleName
from lrm_train.train import TrainConfig, compose
from lrm_train.train.__main__ import main
from lrm_train.train.checkpoint import run_section
from lrm_train.train.config import Precision


def test_compose_with_no_overrides_is_what_the_cli_runs(capsys):
    assert main(["--cfg"]) == 0
    assert capsys.readouterr().out.strip() == OmegaConf.to_yaml(OmegaConf.structured(compose([]))).strip()


def test_the_dataclasses_hold_the_defaults():
    cfg = compose([])
    assert cfg.train == TrainConfig(run_dir="runs/default")  # no YAML restates or changes a train default
    assert cfg.model.hidden_size == 128 and cfg.lrm.placement == "full" and cfg.optim.name == "adamw"


def test_help_says_what_the_program_does_and_lists_the_groups(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Trains a Falcon-H1 hybrid" in out
    for line in ("lrm:      none", "optim:    adamw | muon", "dist:     single | ddp | zero1", "train.max_steps"):
        assert line in out, line


def test_an_unknown_flag_is_one_line(capsys):
    assert main(["--frobnicate"]) == 2
    assert capsys.readouterr().err == "error: unknown option '--frobnicate' (see --help)\n"


@pytest.mark.parametrize(
    "key,value",
    [
        ("dist.name", "zero4"),
        ("dist.backend", "mpi"),
        ("schedule.name", "linear"),
        ("model.ssd_backend", "cuda"),
        ("model.lm_loss_backend", "cuda"),
        ("train.precision", "fp8"),
        ("logging.wandb.mode", "off"),
    ],
)
def test_a_choice_outside_its_enum_is_one_line_naming_the_key(key, value, capsys):
    assert main([f"{key}={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config: {key}: Invalid value '{value}', expected one of [") and err.count("\n") == 1


def test_choices_compose_as_enums_and_are_recorded_as_plain_strings(tmp_path):
    cfg = compose(["dist=zero3", "schedule=wsd", "model.ssd_backend=torch", "train.precision=bf16"])
    assert cfg.dist.name is EngineName.zero3 and cfg.dist.name.zero_stage == 3
    assert cfg.schedule.name is ScheduleName.wsd and cfg.schedule.name.decays
    assert cfg.model.ssd_backend is KernelBackend.torch and cfg.train.precision is Precision.bf16
    (tmp_path / "tokenizer.json").write_text("{}")
    run = run_section(cfg, 8, tmp_path, tmp_path / "tokenizer.json")
    torch.save(run, tmp_path / "run.pt")  # a checkpoint's state.pt is read back with weights_only=True
    loaded = torch.load(tmp_path / "run.pt", weights_only=True)
    assert type(loaded["lrm"]["placement"]) is str and "name: zero3" in loaded["config"]


@pytest.mark.multiprocess
def test_a_config_error_under_torchrun_is_one_line_for_the_job(tmp_path):
    done = cli(["train.max_stepz=1", f"train.run_dir={tmp_path}"], nproc=2, timeout=120)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: config: unknown config key 'train.max_stepz' (check the spelling; --help lists the keys)"]


def test_cfg_prints_the_composed_config_also_in_hydras_spelling(capsys):
    assert main(["optim=muon", "--cfg"]) == 0
    printed = capsys.readouterr().out
    assert main(["--cfg", "job", "optim=muon"]) == 0
    assert capsys.readouterr().out == printed and "name: muon" in printed


def test_a_run_relaunches_from_its_saved_config_without_its_overrides(data_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(as_args(overrides(data_root, run_dir, **{"train.max_steps": 2, "lrm.placement": "scalar"}))) == 0
    capsys.readouterr()
    assert main(["--config-dir", str(run_dir), "--cfg", "job"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert (printed.model.hidden_size, printed.lrm.placement, printed.train.max_steps) == (32, "scalar", 2)
    # Only the new value is typed; everything else (the micro model, its data, its run dir) comes from config.yaml.
    assert main([f"--config-dir={run_dir}", "train.max_steps=4"]) == 0
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]
    assert "resumed from" in capsys.readouterr().err
    assert OmegaConf.load(run_dir / "config.yaml").train.max_steps == 4


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--config-dir", "nothing"], r"nothing/config.yaml: no such file"),
        (["--config-dir", "{run}", "optim=muon"], r"optim=muon: a group option .* set its keys \(optim.<field>=...\)"),
        (["--config-dir", "{run}", "train.max_stepz=3"], r"unknown config key 'train.max_stepz'"),
        (["--config-dir", "{run}", "train.max_steps=many"], r"train.max_steps: Value .many. .* Integer"),
    ],
)
def test_a_bad_relaunch_is_one_line(tmp_path, capsys, monkeypatch, args, error):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(compose([]))))
    assert main([a.format(run=tmp_path / "run") for a in args]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and re.search(error, lines[0]), lines


def test_a_through_multiplier_parametrization_must_match_the_optimizer():
    assert (
        compose(["optim=muon", "model.parametrization=mup_multiplier_muon"]).model.parametrization
        == "mup_multiplier_muon"
    )
    with pytest.raises(ValueError, match=r"mup_multiplier_adamw carries .* optim=muon: use model.parametrization="):
        compose(["optim=muon", "model.parametrization=mup_multiplier_adamw"])


def test_a_hidden_lr_exponent_is_refused_where_no_lr_scales_with_width():
    assert compose(["model=tiny", "optim.hidden_lr_exponent=-0.5"]).optim.hidden_lr_exponent == -0.5
    with pytest.raises(ValueError, match=r"optim.hidden_lr_exponent=-0.5 .* only model.parametrization=mup does"):
        compose(["model=tiny", "model.parametrization=standard", "optim.hidden_lr_exponent=-0.5"])
    with pytest.raises(ValueError, match=r"optim.hidden_lr_exponent=nan must be a finite number"):
        compose(["model=tiny", "optim.hidden_lr_exponent=nan"])
