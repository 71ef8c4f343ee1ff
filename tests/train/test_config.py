from omegaconf import OmegaConf

from lrm_train.train import TrainConfig, compose
from lrm_train.train.__main__ import main


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
