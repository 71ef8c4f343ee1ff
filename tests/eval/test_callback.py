"""The in-loop downstream evaluation (DownstreamEval, attached when eval.tasks is set) and ``python -m lrm_train.eval``
on its checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from runs import as_args, cli, overrides, run_config

from lrm_train.eval.__main__ import main as eval_main
from lrm_train.eval.callback import DownstreamEval
from lrm_train.train import compose, train
from lrm_train.train.callbacks import StepResult, build_callbacks
from lrm_train.train.checkpoint import load_checkpoint
from lrm_train.train.loop import open_trainer

EVAL = {"eval.tasks": "[arc_easy]", "eval.limit": 3, "eval.every": 2}


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("downstream")
    result = train(run_config(data_root, run_dir, **{"train.max_steps": 4, "train.ckpt_every": 2, **EVAL}))
    records = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    return run_dir, {r["step"]: r for r in records}


def test_the_eval_keys_configure_the_callback_the_config_attaches():
    callbacks = build_callbacks(compose(["eval.tasks=[arc_easy,piqa]", "eval.limit=7", "eval.every=5"]))
    downstream = [c for c in callbacks if isinstance(c, DownstreamEval)]
    assert len(downstream) == 1 and downstream[0].name == "downstream"
    assert (downstream[0].tasks, downstream[0].limit, downstream[0].every) == (["arc_easy", "piqa"], 7, 5)


@pytest.mark.multiprocess
def test_a_run_without_tasks_attaches_no_evaluation_and_never_imports_the_harness(data_root, tmp_path):
    assert not any(c.name == "downstream" for c in build_callbacks(compose([])))
    script = (
        "import sys; from runs import run_config; from lrm_train.train import train; "
        f"train(run_config({str(data_root)!r}, {str(tmp_path)!r}, **{{'train.max_steps': 2}})); "
        "assert not [m for m in sys.modules if m.startswith('lm_eval')], 'the harness was imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir()


def test_a_bad_eval_key_fails_while_composing():
    with pytest.raises(ValueError, match=r"^eval.every=0 must be >= 1$"):
        compose(["eval.every=0"])


def test_without_tasks_it_scores_and_keeps_nothing():
    callback = DownstreamEval(tasks=[])
    step = StepResult(2, None, None, None, True, 0.1, 8, 0.1, last=True)
    callback.on_step(trainer=None, step=step)  # with tasks it would score here: the final step is always due
    assert step.metrics == {} and callback.state_dict() == {}


def test_scores_are_logged_every_eval_every_steps(run):
    _, records = run
    assert [step for step, r in records.items() if "eval/arc_easy/acc" in r] == [2, 4]
    for step in (2, 4):
        assert records[step]["eval/arc_easy/acc"] in (0.0, 1 / 3, 2 / 3, 1.0)
        assert records[step]["eval/arc_easy/sample_len"] == 3
    assert records[2]["eval/arc_easy/bpb"] != records[4]["eval/arc_easy/bpb"] > 0  # the model changed


def test_the_checkpoint_keeps_the_last_scores_and_a_resume_restores_them(data_root, run):
    run_dir, records = run
    state = load_checkpoint(run_dir / "checkpoints" / "step_00000004")[1]["callbacks"]["downstream"]
    assert state["last_step"] == 4
    assert state["last_scores"]["arc_easy"]["bpb"] == records[4]["eval/arc_easy/bpb"]
    with open_trainer(run_config(data_root, run_dir, **{"train.max_steps": 4, **EVAL})) as trainer:
        resumed = next(c for c in trainer.callbacks if isinstance(c, DownstreamEval))
        assert (resumed.last_step, resumed.last_scores) == (4, state["last_scores"])


def test_an_unknown_task_stops_the_run_before_its_first_step(data_root, tmp_path, monkeypatch):
    class HarnessIndex:  # lm-eval's real index of its ~15k task configs takes a minute to build
        all_tasks = ("arc_easy", "gsm8k")

    monkeypatch.setattr("lm_eval.tasks.TaskManager", HarnessIndex)
    with pytest.raises(ValueError, match=r"^tasks: 'arc_eazy' is not a task of lm-eval \(offline: hellaswag, "):
        train(run_config(data_root, tmp_path, **{"eval.tasks": "[arc_easy,arc_eazy]"}))
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_the_cli_scores_the_checkpoint_as_the_loop_did(run, capsys):
    run_dir, records = run
    assert eval_main([str(run_dir), "tasks=arc_easy", "limit=3"]) == 0
    results = json.loads((run_dir / "eval" / "step_00000004.json").read_text())
    assert results["checkpoint"] == str(run_dir / "checkpoints" / "step_00000004")
    assert (results["tasks_done"], results["tasks_pending"]) == (["arc_easy"], [])
    assert results["tasks"]["arc_easy"]["acc"] == records[4]["eval/arc_easy/acc"]
    assert results["tasks"]["arc_easy"]["bpb"] == pytest.approx(records[4]["eval/arc_easy/bpb"], rel=1e-5)
    assert results["val_bpb"] > 0
    assert "wrote" in capsys.readouterr().out


@pytest.mark.multiprocess
def test_two_ranks_share_the_items_and_log_what_one_process_scores(data_root, tmp_path):
    scores_dir = tmp_path / "scores"
    scores_dir.mkdir()
    values = overrides(
        data_root,
        tmp_path / "ddp",
        **{
            "dist.name": "ddp",
            "train.max_steps": 2,
            "train.ckpt_every": 2,
            "eval.tasks": "[arc_easy,lambada_openai]",
            "eval.limit": 5,  # an odd count of items (and of requests): one rank scores a padding copy
            "eval.every": 2,
            "eval.batch_size": 4,
            "+callbacks.record._target_": "recorder.RecordScores",
            "+callbacks.record.out": scores_dir,
        },
    )
    done = cli(as_args(values), nproc=2, env={"PYTHONPATH": str(Path(__file__).parent)})
    assert done.returncode == 0, done.stderr[-2000:]
    rank0, rank1 = (json.loads((scores_dir / f"rank{r}_step2.json").read_text()) for r in (0, 1))
    assert (rank0["share"], rank1["share"]) == ([0, 2], [1, 2])
    assert rank0["scores"] == rank1["scores"]

    out = tmp_path / "one_process.json"
    checkpoint = tmp_path / "ddp" / "checkpoints" / "step_00000002"
    assert eval_main([str(checkpoint), "tasks=arc_easy,lambada_openai", "limit=5", "batch_size=3", f"out={out}"]) == 0
    one_process = json.loads(out.read_text())["tasks"]
    logged = rank0["scores"]
    assert {key.split("/")[1] for key in logged} == {"arc_easy", "lambada_openai"}
    for task, metrics in one_process.items():
        for metric, value in metrics.items():
            assert logged[f"eval/{task}/{metric}"] == pytest.approx(value, rel=1e-5), (task, metric)
    assert logged["eval/arc_easy/sample_len"] == 5 and logged["eval/lambada_openai/perplexity"] > 1


def test_bad_arguments_are_one_line(tmp_path, capsys):
    assert eval_main([str(tmp_path / "missing")]) == 2
    assert eval_main([str(tmp_path), "limt=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"error: config: {tmp_path / 'missing'}: no such checkpoint, run directory or model folder"
    assert err[1:] == ["error: config: unknown config key 'limt' (check the spelling; --help lists the keys)"]


def test_tasks_take_the_list_syntax_of_every_command_and_the_older_comma_spelling(tmp_path):
    from lrm_train.eval.__main__ import compose

    assert compose([str(tmp_path), "tasks=[arc_easy,piqa]"]).tasks == ["arc_easy", "piqa"]
    assert compose([str(tmp_path), "tasks=arc_easy,piqa", "limit=0.5"]).tasks == ["arc_easy", "piqa"]
    assert compose([str(tmp_path), "tasks="]).tasks == []
    assert compose([str(tmp_path), "limit=3"]).limit == 3 and isinstance(compose([str(tmp_path), "limit=3"]).limit, int)
