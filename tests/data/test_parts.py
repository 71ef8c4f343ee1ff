"""Preparing in parts: N slices of the source's files tokenized apart, merged into exactly the folder one process
writes; the parts share one tokenizer, trained once beforehand."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from lrm_train.data import DataConfig, TokenData
from lrm_train.data.prepare import main, part_files, prepare
from lrm_train.data.sources import load_corpus

WORDS = [
    "the",
    "king",
    "my",
    "lord",
    "sweet",
    "night",
    "of",
    "day",
    "and",
    "fair",
    "love",
    "death",
    "honour",
    "crown",
    "sword",
]


def write_files(root, count=12):
    """A corpus of ``count`` files of three kinds and uneven sizes (two to forty documents each)."""
    root.mkdir(parents=True)
    for i in range(count):
        docs = [" ".join(WORDS[(i * 7 + j * 3 + k) % len(WORDS)] for k in range(20 + 13 * j)) for j in range(2 + 3 * i)]
        if i % 3 == 0:
            (root / f"f{i:02d}.txt").write_text("\n".join(docs))
        elif i % 3 == 1:
            (root / f"f{i:02d}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        else:
            pq.write_table(pa.table({"text": docs}), root / f"f{i:02d}.parquet", row_group_size=5)
    return root


def config(source, out_root, **overrides):
    settings = dict(name="c", source=str(source), out_root=str(out_root), vocab_size=300, val_fraction=0.1)
    return DataConfig(**{**settings, "num_proc": 1, "shard_tokens": 700, **overrides})


def folder_bytes(folder):
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.suffix in (".bin", ".json") and p.name != "verified.json"
    }


def without_timing(manifest_bytes):
    manifest = json.loads(manifest_bytes)
    manifest.pop("tokenize_seconds")
    return manifest


def assert_identical(one, merged):
    first, second = folder_bytes(one), folder_bytes(merged)
    assert without_timing(first.pop("manifest.json")) == without_timing(second.pop("manifest.json"))
    assert first.keys() == second.keys() and first == second  # every shard and the tokenizer, byte for byte


def run_parts(cfg, num_parts):
    """The recipe of launch/prepare_array.sbatch, in-process: tokenizer, each part, then the merge."""
    cfg.num_parts = num_parts
    prepare(cfg, tokenizer_only=True)
    for part in range(num_parts):
        cfg.part = part
        assert (prepare(cfg) / "part.json").is_file()
    cfg.part = None
    return prepare(cfg)


def test_three_parts_merge_into_the_folder_one_process_writes(tmp_path):
    source = write_files(tmp_path / "corpus")
    one = prepare(config(source, tmp_path / "one"))
    merged = run_parts(config(source, tmp_path / "parts"), 3)
    assert merged.name == one.name  # parts are no setting of the output
    assert_identical(one, merged)
    manifest = json.loads((merged / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) > 3 and manifest["splits"]["val"]["documents"] > 1
    assert not merged.with_name(merged.name + ".parts").exists()  # the intermediate parts are gone once merged
    cfg = config(source, tmp_path / "parts", num_parts=3)
    assert prepare(cfg, tokenizer_only=True) == merged / "tokenizer.json"  # a job run again finds the folder done
    assert not merged.with_name(merged.name + ".parts").exists()


def test_the_merge_prepares_the_parts_still_missing(tmp_path):
    source = write_files(tmp_path / "corpus")
    cfg = config(source, tmp_path / "parts", num_parts=4)
    prepare(cfg, tokenizer_only=True)
    cfg.part = 2
    prepare(cfg)
    cfg.part = None
    assert_identical(prepare(config(source, tmp_path / "one")), prepare(cfg))


def test_when_no_document_hashes_into_validation_the_last_one_is_held_out_in_either_mode(tmp_path):
    source = write_files(tmp_path / "corpus", count=4)
    one = prepare(config(source, tmp_path / "one", val_fraction=1e-9))
    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest["splits"]["val"]["documents"] == 1
    texts = load_corpus(config(source, tmp_path)).texts()
    last_text = texts[-1]
    assert manifest["splits"]["train"]["documents"] == len(texts) - 1
    val = TokenData(one).splits["val"]
    tokens = val.read(0, val.num_tokens)[:-1].tolist()  # without its EOS
    assert Tokenizer.from_file(str(one / "tokenizer.json")).decode(tokens) == last_text
    assert_identical(one, run_parts(config(source, tmp_path / "parts", val_fraction=1e-9), 3))


def test_the_slices_are_contiguous_cover_every_file_and_balance_bytes(tmp_path):
    files = load_corpus(config(write_files(tmp_path / "corpus"), tmp_path)).files
    slices = [part_files(files, 3, i) for i in range(3)]
    assert [f for s in slices for f in s] == files and all(slices)
    sizes = [sum(f.size for f in s) for s in slices]
    assert max(sizes) < 0.6 * sum(sizes)


def test_a_part_without_the_shared_tokenizer_is_refused_with_the_command_to_run(tmp_path, capsys):
    source = write_files(tmp_path / "corpus", count=3)
    common = [f"data.source={source}", f"data.out_root={tmp_path / 'out'}", "data.vocab_size=300", "data.num_parts=3"]
    assert main([*common, "data.part=1"]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: data.part=1: the parts' shared tokenizer ") and "--tokenizer-only" in line
    assert not list((tmp_path / "out").glob("*/part-*"))
    assert main([*common, "--tokenizer-only"]) == 0
    assert capsys.readouterr().out.strip().endswith(".parts/tokenizer.json")
    assert main([*common, "data.part=1"]) == 0
    assert main([*common, "data.part=3"]) == 2
    assert "data.part=3 must be in 0 .. 2" in capsys.readouterr().err


def test_a_hub_dataset_is_not_prepared_in_parts_and_is_refused_before_loading(tmp_path, monkeypatch):
    from lrm_train.data import sources

    def loaded(name, cfg):
        raise AssertionError("the hub dataset was loaded")

    monkeypatch.setattr(sources, "_hub", loaded)
    with pytest.raises(ValueError, match="data.num_parts=2: a hub dataset"):
        prepare(DataConfig(source="hf:x", out_root=str(tmp_path), num_parts=2))


def test_the_merge_refuses_a_part_tokenized_with_another_tokenizer(tmp_path):
    source = write_files(tmp_path / "corpus", count=4)
    cfg = config(source, tmp_path / "parts", num_parts=2)
    prepare(cfg, tokenizer_only=True)
    cfg.part = 1
    part = prepare(cfg)
    info = json.loads((part / "part.json").read_text())
    (part / "part.json").write_text(json.dumps({**info, "tokenizer_sha256": "0" * 64}))
    cfg.part = None
    with pytest.raises(ValueError, match=f"^{part} was tokenized with another tokenizer than .*tokenizer.json"):
        prepare(cfg)
    assert not list((tmp_path / "parts").glob("c-*/manifest.json"))
