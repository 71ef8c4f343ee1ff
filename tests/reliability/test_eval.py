"""Fault cases of ``python -m lrm_train.eval``: bad options, an ``out=`` that cannot be written or would be lost, a
checkpoint that cannot be evaluated as it is. Each is refused with one line naming the key or the file, before any
scoring, and every file that existed is left as it was; a failure while scoring keeps the finished tasks' scores."""

import errno
import json
import os

import pytest
import torch
from faults import (
    STEP_2,
    STEP_4,
    every_checkpoint_corrupt,
    flip_bytes,
    nothing,
    rehash,
    weights_of_a_smaller_model,
    written_before_checkpoints_carried_their_tokenizer,
)
from harness import assert_refused, assert_untouched, run_main, snapshot

from lrm_train.data.prepare import main as prepare_main
from lrm_train.eval import api
from lrm_train.eval.__main__ import main as eval_main

# name: (fault, the arguments after the checkpoint (RUN and TMP: the run's and the test's folders), the line)
CASES = {
    "E04 limit=0": (nothing, ["tasks=arc_easy", "limit=0"], r"^error: config: limit=0: must be > 0"),
    "E05 limit=-1": (nothing, ["tasks=arc_easy", "limit=-1"], r"^error: config: limit=-1: must be > 0"),
    "E05b limit=inf": (nothing, ["tasks=arc_easy", "limit=inf"], r"^error: config: limit=inf: must be > 0"),
    "E09 batch_size=0": (nothing, ["tasks=arc_easy", "batch_size=0"], r"^error: config: batch_size=0: must be >= 1$"),
    "E14 device=cuda without CUDA": (
        nothing,
        ["device=cuda"],
        r"^error: config: device=cuda: CUDA is not available here$",
    ),
    "E14b no such device": (nothing, ["device=gpu0"], r"^error: config: device=gpu0: not a device"),
    "E15 tokenizer= missing": (
        nothing,
        ["tokenizer=TMP/nope.json"],
        r"^error: config: tokenizer=\S+/nope.json: no such file$",
    ),
    "D20 tokenizer= a folder": (
        nothing,
        ["tokenizer=TMP"],
        r"^error: config: tokenizer=\S+: a folder, not a tokenizer.json",
    ),
    "E06 out= under a file": (
        nothing,
        ["tasks=", "out=TMP/a_file/sub/x.json"],
        r"^error: out=\S+/a_file/sub/x.json: \S+/a_file is a file, not a folder$",
    ),
    "E07 out= an existing folder": (nothing, ["tasks=", "out=TMP/a_folder"], r"^error: out=\S+/a_folder: a folder"),
    "H10e out= inside the checkpoint": (
        nothing,
        ["tasks=", f"out=RUN/{STEP_4}/scores.json"],
        r"^error: out=\S+: inside the training checkpoint \S+/step_00000004; keep_last pruning would delete it",
    ),
    "out= in the run's checkpoints folder": (
        nothing,
        ["tasks=", "out=RUN/checkpoints/scores.json"],
        r"^error: out=\S+: inside \S+/checkpoints, the checkpoints folder of a training run",
    ),
    "E11 weights of another model": (
        weights_of_a_smaller_model,
        ["tasks="],
        r"step_00000004: its weights were made for another model than the config it records \(\d+ tensors missing",
    ),
    "N35b a tokenizer that is not the checkpoint's": (
        nothing,
        ["tasks=", "tokenizer=FOREIGN"],
        (
            r"^error: \S+/foreign\d*/tokenizer.json is not the tokenizer checkpoint \S+/step_00000004 was trained with "
            r"\(\S+/step_00000004/tokenizer.json, sha256 [0-9a-f]{12}...\); refusing to pair them$"
        ),
    ),
    "N37 a checkpoint from before checkpoints carried their tokenizer": (
        written_before_checkpoints_carried_their_tokenizer,
        ["tasks="],
        r"step_00000004: written before checkpoints carried their tokenizer; pass the tokenizer.json it was trained with",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_an_evaluation_that_cannot_run_is_refused_with_one_line_and_nothing_is_touched(
    case, copy_of, tmp_path, foreign_tokenizer
):
    fault, args, line = CASES[case]
    run = copy_of()
    fault(run)
    (tmp_path / "a_file").write_text("a file")
    (tmp_path / "a_folder").mkdir()
    args = [
        a.replace("RUN", str(run)).replace("TMP", str(tmp_path)).replace("FOREIGN", str(foreign_tokenizer))
        for a in args
    ]
    before = snapshot(tmp_path)
    assert_refused(run_main(eval_main, [run / STEP_4, *args]), line)
    assert_untouched(before)
    assert snapshot(tmp_path).keys() == before.keys()  # nothing new either: no results, no temporary
    assert not (run / "eval").exists()


def test_e06_an_out_in_a_read_only_folder_is_refused_before_loading(copy_of, tmp_path, monkeypatch):
    # No read-only mount can be made here (the tests may run as root, for whom permissions do not stop a write):
    # the folder answers as a read-only file system does.
    run = copy_of()
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(read_only) else real_access(p, mode))
    before = snapshot(tmp_path)
    line = assert_refused(
        run_main(eval_main, [run / STEP_4, "tasks=arc_easy", f"out={read_only}/sub/x.json"]),
        r"^error: out=\S+/ro/sub/x.json: cannot write in \S+/ro \(read-only or no permission\)$",
    )
    assert "Traceback" not in line
    assert_untouched(before)
    assert list(read_only.iterdir()) == []


def test_e06b_a_write_that_fails_is_one_line_naming_the_file_and_the_previous_results_are_kept(
    copy_of, tmp_path, monkeypatch
):
    run = copy_of()
    out = tmp_path / "scores.json"
    out.write_text('{"previous": "results"}')
    before = snapshot(tmp_path)

    def read_only_replace(src, dst):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", read_only_replace)
    assert_refused(
        run_main(eval_main, [run / STEP_4, "tasks=", f"out={out}"]),
        rf"^error: cannot write {out}: Read-only file system$",
    )
    assert_untouched(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "scores.json"]  # no temporary, no .partial


def test_a_failure_in_a_later_task_keeps_the_scores_of_the_finished_ones(copy_of, tmp_path, monkeypatch):
    run = copy_of()
    out = tmp_path / "scores.json"
    real_run_harness = api.run_harness

    def piqa_fails(lm, tasks, limit):
        if tasks == ["piqa"]:
            raise ValueError("piqa: the harness gave up")
        return real_run_harness(lm, tasks, limit)

    monkeypatch.setattr(api, "run_harness", piqa_fails)
    outcome = run_main(eval_main, [run / STEP_4, "tasks=arc_easy,piqa", "limit=2", f"out={out}"])
    assert_refused(outcome, r"^error: piqa: the harness gave up$")
    assert f"note: {out} keeps what was scored before that (tasks done: arc_easy)" in outcome.stderr
    saved = json.loads(out.read_text())
    assert (saved["tasks_done"], saved["tasks_pending"]) == (["arc_easy"], ["piqa"])
    assert saved["tasks"]["arc_easy"]["acc"] in (0.0, 0.5, 1.0) and saved["tasks"]["arc_easy"]["bpb"] > 0
    assert saved["val_bpb"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "scores.json"]


def test_e16_a_run_whose_newest_checkpoint_is_corrupt_is_evaluated_at_the_newest_that_verifies(
    copy_of, tmp_path, caplog
):
    run = copy_of()
    assert eval_main([str(run / STEP_2), "tasks=", f"out={tmp_path / 'step_2.json'}"]) == 0
    flip_bytes(run / STEP_4 / "model.safetensors")
    before = snapshot(run / "checkpoints")
    outcome = run_main(eval_main, [run, "tasks="])
    assert outcome.code == 0 and not outcome.escaped and not outcome.error_lines, outcome.stderr
    # The warning, as training's resume gives it (on stderr from the command line; pytest captures it as a record).
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"skipping checkpoint {run / STEP_4}: model.safetensors does not match its checksum (corrupt or tampered with)"
    ]
    results = json.loads((run / "eval" / "step_00000002.json").read_text())  # named after the one evaluated
    assert results["checkpoint"] == str(run / STEP_2)
    assert results["val_bpb"] == json.loads((tmp_path / "step_2.json").read_text())["val_bpb"] > 0
    assert_untouched(before)
    assert not (run / "eval" / "step_00000004.json").exists()


def test_e16b_a_run_none_of_whose_checkpoints_verifies_is_refused(copy_of):
    run = copy_of()
    every_checkpoint_corrupt(run)
    before = snapshot(run)
    assert_refused(run_main(eval_main, [run, "tasks="]), r"no checkpoint of \S+/checkpoints loads \(step_00000004: ")
    assert_untouched(before, ignore=("train_rank0.log",))
    assert not (run / "eval").exists()


def test_n37_a_checkpoint_from_before_takes_the_tokenizer_given_and_says_why_it_has_no_val_bpb(copy_of, tmp_path):
    run = copy_of()
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_bytes((run / STEP_4 / "tokenizer.json").read_bytes())
    written_before_checkpoints_carried_their_tokenizer(run)
    out = tmp_path / "scores.json"
    outcome = run_main(eval_main, [run / STEP_4, "tasks=", f"tokenizer={tokenizer}", f"out={out}"])
    assert outcome.code == 0 and not outcome.error_lines, outcome.stderr
    results = json.loads(out.read_text())
    assert results["val_bpb"] is None
    assert "was written before checkpoints recorded their data folder" in results["val_bpb_unavailable"]
    assert outcome.stderr.count("note: no validation bpb: ") == 1


def test_val_bpb_of_a_run_whose_data_folder_is_gone_is_null_with_the_reason(copy_of, tmp_path):
    run = copy_of()
    checkpoint = run / STEP_4
    plain = torch.load(checkpoint / "state.pt", weights_only=True)
    plain["run"]["data"]["folder"] = str(tmp_path / "deleted")  # as if the prepared folder had been deleted
    torch.save(plain, checkpoint / "state.pt")
    rehash(checkpoint)
    out = tmp_path / "scores.json"
    outcome = run_main(eval_main, [checkpoint, "tasks=", f"out={out}"])
    assert outcome.code == 0 and not outcome.error_lines, outcome.stderr
    results = json.loads(out.read_text())
    assert results["val_bpb"] is None and results["tasks_pending"] == []
    reason = f"the run's data folder is not readable ({tmp_path / 'deleted'}/manifest.json: no such file"
    assert results["val_bpb_unavailable"].startswith(reason)
    assert outcome.stderr.count("note: no validation bpb: ") == 1


def test_d20_prepare_names_a_tokenizer_path_that_is_a_folder_as_one(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("a small document")
    (corpus / "b.txt").write_text("another small document")
    argv = ["data=local_text", f"data.source={corpus}", f"data.tokenizer={corpus}", f"data.out_root={tmp_path / 'd'}"]
    assert_refused(
        run_main(prepare_main, argv), r"^error: data.tokenizer: \S+/corpus is a folder, not a tokenizer.json"
    )
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())
