"""Fault cases of the data: a corpus or a tokenizer that cannot be prepared (``python -m lrm_train.data.prepare``), and
prepared shards that are corrupt when the trainer opens them. Each is one line naming the file or the key, exit 2,
nothing written where the output would go, and the corpus and the prepared folder left byte for byte as they were."""

import json
import shutil

import pytest
from harness import assert_refused, assert_untouched, run_main, snapshot
from runs import as_args, overrides

from lrm_train.data.prepare import main as prepare_main
from lrm_train.train.__main__ import main as train_main


def write(folder, files: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())


GOOD = {"a.txt": "the first document, long enough to hold a few words\n", "b.txt": "and a second one\n"}
CORPORA = {
    # name: (files in the corpus folder, extra overrides, the line)
    "D02 an empty folder": ({}, [], r"data.source: \S+ has no files of a supported type"),
    "D03 a 0-byte text": ({"a.txt": ""}, [], r"the corpus has 0 non-empty documents; at least 2 are needed"),
    "D04 an empty jsonl": ({"a.jsonl": ""}, [], r"a.jsonl: empty \(no JSON records\)"),
    "D05 jsonl without text": ({"a.jsonl": '{"content": "x"}\n'}, [], r"a.jsonl: line 1: no 'text' field"),
    "D06 a malformed line": ({"a.jsonl": '{"text": "x"}\n{"text": "y\n'}, [], r"a.jsonl: line 2: not valid JSON"),
    "D09 a 0-byte parquet": ({"a.parquet": b""}, [], r"a.parquet: not a readable Parquet file"),
    "D15 text that is a number": ({"a.jsonl": '{"text": 123}\n'}, [], r"line 1: 'text' is an int, not a string"),
    "D16 latin-1 jsonl": ({"a.jsonl": '{"text": "caf\xe9"}\n'.encode("latin-1")}, [], r"not valid UTF-8"),
    "D17 only csv": ({"a.csv": "x,y\n"}, [], r"has no files of a supported type .*; 1 other file skipped"),
    "D19 one document": ({"a.txt": "only one\n"}, [], r"the corpus has 1 non-empty documents; at least 2"),
    "D12 a tokenizer of random bytes": (GOOD, ["data.tokenizer=CORPUS/a.txt"], r"is not a valid tokenizer.json"),
    "D20 a tokenizer that is a folder": (GOOD, ["data.tokenizer=CORPUS"], r"data.tokenizer: \S+ is a folder"),
    "D24 a trainer group": (GOOD, ["optim=muon"], r"optim=muon: prepare takes data settings only"),
    "D25 a typo": (GOOD, ["data.vocab_sise=512"], r"unknown config key 'data.vocab_sise'"),
    "D26 val_fraction": (GOOD, ["data.val_fraction=2"], r"data.val_fraction=2.0 must be in \(0, 1\)"),
    "D01 no such source": (GOOD, ["data.source=CORPUS/nope"], r"data.source: \S+/nope does not exist"),
}


@pytest.mark.parametrize("case", CORPORA)
def test_a_corpus_that_cannot_be_prepared_is_one_line_and_writes_nothing(case, tmp_path):
    files, extra, line = CORPORA[case]
    corpus = tmp_path / "corpus"
    write(corpus, files)
    before = snapshot(corpus)
    argv = ["data=local_text", f"data.source={corpus}", f"data.out_root={tmp_path / 'out'}", "data.vocab_size=300"]
    argv += [arg.replace("CORPUS", str(corpus)) for arg in extra]
    assert_refused(run_main(prepare_main, argv), line)
    assert_untouched(before)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def flip_a_byte_of_the_train_shard(folder):
    shard = next(folder.glob("train_*.bin"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))


def truncate_the_val_shard(folder):
    shard = next(folder.glob("val_*.bin"))
    shard.write_bytes(shard.read_bytes()[:1000])


def manifest_without_splits(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["splits"]
    (folder / "manifest.json").write_text(json.dumps(manifest))


PREPARED = {
    "D21 a flipped byte in a shard": (flip_a_byte_of_the_train_shard, r"train_00000.bin: checksum does not match"),
    "D22 a truncated shard": (truncate_the_val_shard, r"val_00000.bin: 1000 bytes, manifest.json says \d+"),
    "D23 a manifest without splits": (manifest_without_splits, r"manifest.json: not a valid token manifest"),
}


@pytest.mark.parametrize("case", PREPARED)
def test_corrupt_prepared_data_stops_the_trainer_with_one_line(case, data_root, reference_run, tmp_path):
    fault, line = PREPARED[case]  # (the reference run prepared data_root)
    shutil.copytree(data_root, tmp_path / "data")
    [folder] = [p for p in (tmp_path / "data").iterdir() if (p / "manifest.json").exists()]
    fault(folder)
    before = snapshot(tmp_path / "data")
    run = overrides(tmp_path / "data", tmp_path / "run", **{"train.max_steps": 2})
    assert_refused(run_main(train_main, as_args(run)), line)
    assert_untouched(before)
    assert not (tmp_path / "run" / "checkpoints").exists()
