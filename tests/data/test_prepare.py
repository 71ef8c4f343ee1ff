import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer

import lrm_train.data.prepare as prepare_module
from lrm_train.data import DataConfig, TokenData
from lrm_train.data.prepare import is_validation, prepare
from lrm_train.data.sources import load_corpus


def documents_of(folder, split):
    data = TokenData(folder)
    tokens = data.splits[split].read(0, data.splits[split].num_tokens)
    ends = np.flatnonzero(tokens == data.eos_id)
    assert ends[-1] == len(tokens) - 1  # every document, the last one included, ends with EOS
    return [tokens[start:end] for start, end in zip(np.r_[0, ends[:-1] + 1], ends)]


def test_each_documents_tokens_decode_to_its_text_and_splits_are_disjoint(small_cfg, prepared):
    documents = list(load_corpus(small_cfg).documents())
    texts = [text for _, text in documents]
    held_out = [is_validation(key, small_cfg.val_fraction, small_cfg.split_seed) for key, _ in documents]
    train_idx = [i for i, val in enumerate(held_out) if not val]
    val_idx = [i for i, val in enumerate(held_out) if val]
    assert val_idx and len(train_idx) + len(val_idx) == len(texts) == 13
    assert any(t.startswith("An Arrow document") for t in texts) and any(t.startswith("Record 2") for t in texts)
    tokenizer = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    for split, indices in (("train", train_idx), ("val", val_idx)):
        docs = documents_of(prepared, split)
        assert [tokenizer.decode(d.tolist()) for d in docs] == [texts[i] for i in indices]
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and 300 < manifest["tokenizer"]["vocab_size"] <= 400
    assert manifest["splits"]["val"]["documents"] == len(val_idx)
    assert len(manifest["splits"]["train"]["shards"]) > 1  # shard_tokens=500 forces several shards
    assert all(len(s["sha256"]) == 64 for s in manifest["splits"]["train"]["shards"])


def test_same_config_reuses_the_folder_and_a_changed_one_writes_a_new_one(small_cfg, prepared):
    stamp = (prepared / "manifest.json").stat().st_mtime_ns
    assert prepare(small_cfg) == prepared
    assert (prepared / "manifest.json").stat().st_mtime_ns == stamp
    small_cfg.vocab_size = 420
    other = prepare(small_cfg)
    assert other != prepared and (other / "manifest.json").exists()


def test_a_prepared_folder_is_found_without_reading_the_corpus_and_a_changed_file_is_noticed(
    small_cfg, prepared, corpus_dir, monkeypatch
):
    import lrm_train.data.prepare as prepare_module

    def unread(cfg):
        raise AssertionError("the corpus was read")

    with monkeypatch.context() as patched:
        patched.setattr(prepare_module, "load_corpus", unread)
        assert prepare(small_cfg) == prepared  # from the files' names, sizes and times alone
    text = next(f for f in corpus_dir.rglob("*.txt"))
    text.write_text(text.read_text() + " More.")
    changed = prepare(small_cfg)
    assert changed != prepared and (changed / "manifest.json").exists()


def test_prepare_is_deterministic(small_cfg, prepared, tmp_path):
    small_cfg.out_root = str(tmp_path / "again")
    again = prepare(small_cfg)
    for name in ("manifest.json", "tokenizer.json"):
        first, second = json.loads((prepared / name).read_text()), json.loads((again / name).read_text())
        first.pop("tokenize_seconds", None), second.pop("tokenize_seconds", None)
        assert first == second


def test_parallel_tokenization_gives_the_same_tokens(small_cfg, prepared, tmp_path):
    small_cfg.out_root, small_cfg.num_proc = str(tmp_path / "parallel"), 2
    parallel = prepare(small_cfg)
    assert (
        json.loads((parallel / "manifest.json").read_text())["splits"]
        == (json.loads((prepared / "manifest.json").read_text())["splits"])
    )


def test_default_corpus_installs_with_the_project(tmp_path, caplog):
    cfg = DataConfig(out_root=str(tmp_path), vocab_size=512)
    with caplog.at_level(logging.WARNING):
        texts = load_corpus(cfg).texts()
    assert not caplog.records  # the package's own __init__.py is not a skipped corpus file
    assert len(texts) == 38 and "Hamlet" in "".join(t[:200] for t in texts)


def test_existing_tokenizer_is_reused(small_cfg, prepared, tmp_path):
    small_cfg.tokenizer, small_cfg.out_root = str(prepared / "tokenizer.json"), str(tmp_path / "reuse")
    reused = prepare(small_cfg)
    assert (
        json.loads((reused / "manifest.json").read_text())["splits"]
        == (json.loads((prepared / "manifest.json").read_text())["splits"])
    )


# Bad input: one clear error naming the culprit, nothing half-written.


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.source: .*nowhere does not exist"):
        prepare(DataConfig(source=str(tmp_path / "nowhere"), out_root=str(tmp_path)))


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    with pytest.raises(ValueError, match="0 non-empty documents"):
        prepare(DataConfig(source=str(tmp_path / "empty"), out_root=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_invalid_utf8_is_replaced_counted_and_warned(small_cfg, corpus_dir, caplog):
    (corpus_dir / "broken.txt").write_bytes(b"valid start \xff\xfe then more text \xc3( end")
    with caplog.at_level(logging.WARNING):
        out = prepare(small_cfg)
    counts = json.loads((out / "manifest.json").read_text())["invalid_utf8"]
    assert list(counts.values()) == [3] and next(iter(counts)).endswith("broken.txt")
    assert "broken.txt: invalid UTF-8" in caplog.text


def test_tokenizer_too_large_for_uint16(small_cfg, prepared, tmp_path):
    big = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    big.add_tokens([f"extra{i}" for i in range(70_000)])
    big.save(str(tmp_path / "big.json"))
    small_cfg.tokenizer, small_cfg.token_dtype = str(tmp_path / "big.json"), "uint16"
    with pytest.raises(
        ValueError, match=r"data.token_dtype=uint16 cannot hold the 70\d\d\d-token vocabulary of .*big.json"
    ):
        prepare(small_cfg)
    small_cfg.token_dtype = "auto"
    assert json.loads((prepare(small_cfg) / "manifest.json").read_text())["dtype"] == "uint32"


def test_interrupted_prepare_leaves_nothing_that_looks_complete(small_cfg, monkeypatch, tmp_path):
    from lrm_train.data import prepare as prepare_module

    def interrupt(self, tokens):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module._ShardWriter, "write", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare(small_cfg)
    out_root = tmp_path / "out"
    assert not list(out_root.glob("*/manifest.json")) and not list(out_root.glob(".tmp-*"))


def test_hub_dataset_offline_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match="data.source=hf:no-such/dataset: cannot load it"):
        prepare(DataConfig(source="hf:no-such/dataset", out_root=str(tmp_path)))


@pytest.mark.multiprocess
def test_cli_reports_one_line_and_exits_non_zero(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lrm_train.data.prepare",
            f"data.source={tmp_path / 'missing'}",
            f"data.out_root={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"error: data.source: {tmp_path / 'missing'} does not exist"]
    typo = subprocess.run(
        [sys.executable, "-m", "lrm_train.data.prepare", "data.vocab_sise=5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert typo.returncode != 0 and "vocab_sise" in typo.stderr


def test_off_a_terminal_prepare_writes_plain_lines_and_no_bars(small_cfg, tmp_path, capfd, caplog, monkeypatch):
    monkeypatch.setattr(prepare_module, "_LOG_SECONDS", 0)  # a progress line after every batch
    small_cfg.out_root = str(tmp_path / "log")
    with caplog.at_level(logging.INFO):
        prepare(small_cfg)
    err = capfd.readouterr().err
    assert "\r" not in err and "Filter" not in err and "tokenize (" not in err
    assert any(r.getMessage() == "tokenized 13 documents" for r in caplog.records)
