"""In-loop downstream evaluation (the DownstreamEval callback) and ``python -m lrm_train.eval`` on its checkpoint."""

import json

import pytest
from runs import run_config

from lrm_train.eval.__main__ import main as eval_main
from lrm_train.train import train
from lrm_train.train.callbacks import DownstreamEval, build_callbacks
from lrm_train.train.checkpoint import load_checkpoint

EVAL = {"eval.tasks": "[arc_easy]", "eval.limit": 3, "eval.every": 2}


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("downstream")
    result = train(run_config(data_root, run_dir, **{"train.max_steps": 4, "train.ckpt_every": 2, **EVAL}))
    records = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    return run_dir, {r["step"]: r for r in records}


def test_no_tasks_no_callback(data_root, tmp_path):
    assert not any(isinstance(c, DownstreamEval) for c in build_callbacks(run_config(data_root, tmp_path)))


def test_scores_are_logged_every_eval_every_steps(run):
    _, records = run
    assert [step for step, r in records.items() if "eval/arc_easy/acc" in r] == [2, 4]
    for step in (2, 4):
        assert records[step]["eval/arc_easy/acc"] in (0.0, 1 / 3, 2 / 3, 1.0)
        assert records[step]["eval/arc_easy/sample_len"] == 3
    assert records[2]["eval/arc_easy/bpb"] != records[4]["eval/arc_easy/bpb"] > 0  # the model changed


def test_the_checkpoint_keeps_the_last_scores(run):
    run_dir, records = run
    state = load_checkpoint(run_dir / "checkpoints" / "step_00000004")[1]["callbacks"]["downstream"]
    assert state["last_step"] == 4
    assert state["last_scores"]["arc_easy"]["bpb"] == records[4]["eval/arc_easy/bpb"]


def test_the_cli_scores_the_checkpoint_as_the_loop_did(run, capsys):
    run_dir, records = run
    assert eval_main([str(run_dir), "tasks=arc_easy", "limit=3"]) == 0
    results = json.loads((run_dir / "eval" / "step_00000004.json").read_text())
    assert results["tasks"]["arc_easy"]["acc"] == records[4]["eval/arc_easy/acc"]
    assert results["tasks"]["arc_easy"]["bpb"] == pytest.approx(records[4]["eval/arc_easy/bpb"], rel=1e-5)
    assert results["val_bpb"] > 0
    assert "wrote" in capsys.readouterr().out


def test_bad_arguments_are_one_line(tmp_path, capsys):
    assert eval_main([str(tmp_path / "missing")]) == 2
    assert eval_main([str(tmp_path), "limt=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "missing" in err[0] and "limt=3" in err[1]
