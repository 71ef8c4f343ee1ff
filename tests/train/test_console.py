"""What a run prints: plain step lines where the console is not a terminal (Slurm, CI, a redirect), a progress bar
where it is, and the same lines in train_rank0.log either way."""

import json
import re
import sys

import pytest
from runs import run_config

from lrm_train.train import train

LINE = re.compile(
    r"step (\d+)/8 loss \d+\.\d{4} lr \S+ grad_norm \S+ tokens/s [\d,]+ mfu \d+\.\d% memory \d+\.\d\d GB eta \d+m\d\ds$"
)


def step_lines(text: str) -> list[int]:
    return [int(m.group(1)) for line in text.splitlines() if (m := LINE.search(line))]


@pytest.mark.parametrize("terminal", [False, True], ids=["redirected", "terminal"])
def test_every_log_step_is_a_plain_line_unless_a_terminal_shows_the_bar(
    data_root, tmp_path, capsys, monkeypatch, terminal
):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    train(run_config(data_root, tmp_path, **{"train.log_every": 2, "logging.progress": True}))
    console = capsys.readouterr().err
    assert step_lines((tmp_path / "train_rank0.log").read_text()) == [2, 4, 6, 8]
    assert step_lines(console) == ([] if terminal else [2, 4, 6, 8])
    assert ("train:" in console and "\r" in console) == terminal  # tqdm's bar, only on a terminal
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in records]
    assert (
        [r["step"] for r in records] == [2, 4, 6, 8] and times == sorted(times) and times[0] > 1.7e9
    )  # wall-clock seconds


def test_the_experiments_name_and_tags_reach_wandb(data_root, tmp_path, monkeypatch):
    import wandb

    opened = {}

    class Run:
        dir = str(tmp_path / "wandb" / "run" / "files")

        def log(self, *args, **kwargs):
            pass

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: opened.update(kwargs) or Run())
    extra = {"logging.wandb.mode": "offline", "experiment.name": "mine", "experiment.tags": "[lrm,ablation]"}
    train(run_config(data_root, tmp_path, **{"train.max_steps": 2, **extra}))
    assert (opened["name"], opened["tags"], opened["mode"]) == ("mine", ["lrm", "ablation"], "offline")
