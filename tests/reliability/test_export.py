"""Fault cases of ``python -m lrm_train.hf``: an output where training would delete it, a tokenizer that is not the
checkpoint's, weights of another model. Each is refused with one line and every file that existed is left as it was.
And the reviewer's N33-N36: a checkpoint's tokenizer and data survive a change of its corpus."""

import json
import random
from pathlib import Path

import pytest
import torch
from faults import (
    STEP_4,
    nothing,
    weights_of_a_smaller_model,
    written_before_checkpoints_carried_their_tokenizer,
)
from harness import assert_refused, assert_untouched, run_main, snapshot
from runs import as_args, overrides

from lrm_train.data.prepare import main as prepare_main
from lrm_train.eval.__main__ import main as eval_main
from lrm_train.hf.__main__ import main as hf_main
from lrm_train.train.__main__ import main as train_main
from lrm_train.utils import sha256_file


@pytest.fixture(scope="module")
def hf_folder(reference_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hf"
    assert hf_main(["export", str(reference_run / STEP_4), str(out)]) == 0
    return out


# name: (fault, the arguments (RUN, TMP, HF, FOREIGN: the run's, the test's, an export's folder; another tokenizer),
# the line)
CASES = {
    "H10 export into the checkpoint": (
        nothing,
        ["export", f"RUN/{STEP_4}", f"RUN/{STEP_4}/hf"],
        r"^error: OUT_DIR \S+/hf: inside the training checkpoint \S+/step_00000004; keep_last pruning would delete it",
    ),
    "H10b export into the run's checkpoints folder": (
        nothing,
        ["export", f"RUN/{STEP_4}", "RUN/checkpoints/hf"],
        r"^error: OUT_DIR \S+/checkpoints/hf: inside \S+/checkpoints, the checkpoints folder of a training run",
    ),
    "H10c export as a checkpoint name training will write": (
        nothing,
        ["export", f"RUN/{STEP_4}", "RUN/checkpoints/step_00000006"],
        r"^error: OUT_DIR \S+/step_00000006: inside \S+/checkpoints, the checkpoints folder of a training run",
    ),
    "H10d import into the checkpoint": (
        nothing,
        ["import", "HF", f"RUN/{STEP_4}/ours"],
        r"^error: OUT_DIR \S+/ours: inside the training checkpoint \S+/step_00000004",
    ),
    "H07 weights of another model": (
        weights_of_a_smaller_model,
        ["export", f"RUN/{STEP_4}", "TMP/hf"],
        r"step_00000004: its weights were made for another model than the config it records \(\d+ tensors missing",
    ),
    "--tokenizer a folder": (
        nothing,
        ["export", f"RUN/{STEP_4}", "TMP/hf", "--tokenizer", "TMP"],
        r"^error: config: tokenizer=\S+: a folder, not a tokenizer.json file$",
    ),
    "--tokenizer missing": (
        nothing,
        ["export", f"RUN/{STEP_4}", "TMP/hf", "--tokenizer", "TMP/nope.json"],
        r"^error: config: tokenizer=\S+/nope.json: no such file$",
    ),
    "N36b a tokenizer that is not the checkpoint's": (
        nothing,
        ["export", f"RUN/{STEP_4}", "TMP/hf", "--tokenizer", "FOREIGN"],
        (
            r"^error: \S+/foreign\d*/tokenizer.json is not the tokenizer checkpoint \S+/step_00000004 was trained with "
            r"\(\S+/step_00000004/tokenizer.json, sha256 [0-9a-f]{12}...\); refusing to pair them$"
        ),
    ),
    "N37 a checkpoint from before checkpoints carried their tokenizer": (
        written_before_checkpoints_carried_their_tokenizer,
        ["export", f"RUN/{STEP_4}", "TMP/hf"],
        r"step_00000004: written before checkpoints carried their tokenizer; pass the tokenizer.json it was trained with",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_an_export_that_cannot_be_made_is_refused_with_one_line_and_nothing_is_touched(
    case, copy_of, tmp_path, hf_folder, foreign_tokenizer
):
    fault, args, line = CASES[case]
    run = copy_of()
    fault(run)
    names = {"RUN": run, "TMP": tmp_path, "HF": hf_folder, "FOREIGN": foreign_tokenizer}
    for name, value in names.items():
        args = [a.replace(name, str(value)) for a in args]
    before = snapshot(tmp_path, hf_folder)
    assert_refused(run_main(hf_main, args), line)
    assert_untouched(before)
    assert snapshot(tmp_path, hf_folder).keys() == before.keys()  # nothing new either: no output, no temporary


def test_n37_a_checkpoint_from_before_exports_with_the_tokenizer_given(copy_of, tmp_path):
    run = copy_of()
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_bytes((run / STEP_4 / "tokenizer.json").read_bytes())
    written_before_checkpoints_carried_their_tokenizer(run)
    assert hf_main(["export", str(run / STEP_4), str(tmp_path / "hf"), "--tokenizer", str(tokenizer)]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == tokenizer.read_bytes()


def write_corpus(folder, documents: int = 12) -> None:
    """Documents of made-up English, a few KB each (enough validation tokens for the micro run)."""
    words = ("the", "cat", "dog", "sat", "ran", "on", "a", "mat", "under", "over", "house", "tree", "river", "stone")
    rng = random.Random(0)
    folder.mkdir()
    for n in range(documents):
        text = " ".join(rng.choice(words) for _ in range(600))
        (folder / f"doc_{n:02d}.txt").write_text(text.capitalize() + ".\n")


def val_bpb(checkpoint, out, *extra) -> float:
    assert eval_main([str(checkpoint), "tasks=", f"out={out}", *map(str, extra)]) == 0
    return json.loads(out.read_text())["val_bpb"]


def test_n33_to_n36_a_checkpoint_keeps_its_tokenizer_and_data_when_its_corpus_changes(tmp_path):
    corpus, data_root, run = tmp_path / "corpus", tmp_path / "data", tmp_path / "run"
    write_corpus(corpus)
    local = {"data": "local_text", "data.source": corpus, "train.max_steps": 2, "train.ckpt_every": 2}
    assert train_main(as_args(overrides(data_root, run, **local))) == 0
    checkpoint = run / "checkpoints" / "step_00000002"
    recorded = torch.load(checkpoint / "state.pt", weights_only=True)["run"]["data"]
    training_tokenizer = Path(recorded["folder"]) / "tokenizer.json"  # what prepare made for this run
    training_bytes = training_tokenizer.read_bytes()
    assert sha256_file(training_tokenizer) == recorded["tokenizer_sha256"]
    before_change = val_bpb(checkpoint, tmp_path / "before.json")
    assert before_change > 0

    for i in range(8):  # several, so that the split (a hash of each document) puts some in the training part
        (corpus / f"zz_new_{i}.txt").write_text(f"one more document, number {i}, zebra quartz {i}" * 20)
    kept = snapshot(checkpoint)
    # N34: the evaluation still finds its data, and scores what it scored before.
    assert val_bpb(checkpoint, tmp_path / "after.json") == before_change
    # N35: the run's own tokenizer, given, is accepted.
    assert val_bpb(checkpoint, tmp_path / "given.json", f"tokenizer={training_tokenizer}") == before_change
    # N33: the export carries the training tokenizer, byte for byte.
    assert hf_main(["export", str(checkpoint), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == training_bytes

    # N36: preparing the changed corpus trains another tokenizer; the checkpoint ignores it, and refuses it when given.
    prepared = run_main(
        prepare_main, ["data=local_text", f"data.source={corpus}", "data.vocab_size=512", f"data.out_root={data_root}"]
    )
    assert prepared.code == 0, prepared.stderr
    other_tokenizer = Path(prepared.stdout.strip().splitlines()[-1]) / "tokenizer.json"
    assert sha256_file(other_tokenizer) != recorded["tokenizer_sha256"]
    assert hf_main(["export", str(checkpoint), str(tmp_path / "hf_again")]) == 0
    assert (tmp_path / "hf_again" / "tokenizer.json").read_bytes() == training_bytes
    refused = r"is not the tokenizer checkpoint \S+/step_00000002 was trained with"
    assert_refused(
        run_main(hf_main, ["export", checkpoint, tmp_path / "hf_other", "--tokenizer", other_tokenizer]), refused
    )
    assert_refused(run_main(eval_main, [checkpoint, "tasks=", f"tokenizer={other_tokenizer}"]), refused)
    assert not (tmp_path / "hf_other").exists() and not (run / "eval").exists()
    assert_untouched(kept)
