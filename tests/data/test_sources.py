"""Bad source files: one error naming the file (and the line for JSON Lines), before any tokenizer is trained."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lrm_train.data import DataConfig
from lrm_train.data.sources import load_corpus


def corpus_with(tmp_path, name: str, content: bytes):
    """A folder with two good text documents and one more file."""
    root = tmp_path / "corpus"
    root.mkdir(parents=True)
    (root / "a.txt").write_text("first good document")
    (root / "b.txt").write_text("second good document")
    (root / name).write_bytes(content)
    return DataConfig(source=str(root), out_root=str(tmp_path / "out")), root / name


def jsonl(*lines: str) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


@pytest.mark.parametrize(
    "content, complaint",
    [
        (b"", "empty (no JSON records)"),
        (b"\n  \n", "empty (no JSON records)"),
        (
            jsonl('{"text": "fine"}', '{"text": "broken"'),
            "line 2: not valid JSON (Expecting ',' delimiter at column 18)",
        ),
        (jsonl('{"text": "fine"}', "", '{"text": 3}'), "line 3: 'text' is an int, not a string"),
        (jsonl('{"text": "fine"}', '{"body": "x"}'), "line 2: no 'text' field"),
        (jsonl('{"text": "fine"}', '["a list"]'), "line 2: a JSON object is expected, found a list"),
        ('{"text": "café"}\n'.encode("latin-1"), "line 1: not valid UTF-8 (the file must be UTF-8)"),
    ],
)
def test_bad_jsonl_names_the_file_and_line(tmp_path, content, complaint):
    cfg, bad = corpus_with(tmp_path, "records.jsonl", content)
    with pytest.raises(ValueError) as error:
        load_corpus(cfg).texts()  # records are checked as they are read
    assert str(error.value) == f"{bad}: {complaint}"


def test_a_json_array_file_is_read_and_checked_by_record(tmp_path):
    cfg, bad = corpus_with(tmp_path, "records.json", json.dumps([{"text": "one"}, {"text": "two"}]).encode())
    assert sorted(load_corpus(cfg).texts()) == sorted(
        ["first good document", "second good document"]
        + [
            "one",
            "two",
        ]
    )
    bad.write_text(json.dumps([{"text": "one"}, {"text": None}]))
    with pytest.raises(ValueError, match=rf"^{bad}: record 2: 'text' is null, not a string$"):
        load_corpus(cfg).texts()


def test_text_field_is_read_from_jsonl(tmp_path):
    cfg, _ = corpus_with(tmp_path, "records.jsonl", jsonl('{"body": "from the body field"}'))
    cfg.text_field = "body"
    assert "from the body field" in load_corpus(cfg).texts()


def test_a_changed_jsonl_file_is_read_again(tmp_path):
    cfg, path = corpus_with(tmp_path, "records.jsonl", jsonl('{"text": "old text"}'))
    assert "old text" in load_corpus(cfg).texts()
    path.write_bytes(jsonl('{"text": "new text, longer"}'))
    assert "new text, longer" in load_corpus(cfg).texts()


def test_zero_byte_parquet_and_arrow_name_the_file(tmp_path):
    for name in ("table.parquet", "table.arrow"):
        cfg, bad = corpus_with(tmp_path / name, name, b"")
        with pytest.raises(ValueError, match=rf"^{bad}: not a readable {'Parquet' if 'parquet' in name else 'Arrow'} "):
            load_corpus(cfg)


def test_a_parquet_file_without_a_string_text_column_is_named(tmp_path):
    cfg, bad = corpus_with(tmp_path, "good.parquet", b"")
    pq.write_table(pa.table({"text": [1, 2]}), bad)
    with pytest.raises(ValueError, match=rf"^{bad}: column 'text' holds int64, not strings$"):
        load_corpus(cfg)
    pq.write_table(pa.table({"body": ["x"]}), bad)
    with pytest.raises(ValueError, match=rf"^data.text_field='text' is not a column of {bad} \(columns: body\)$"):
        load_corpus(cfg)


def test_unsupported_files_in_a_folder_are_listed_in_a_warning(tmp_path, caplog):
    cfg, _ = corpus_with(tmp_path, "paper.pdf", b"%PDF")
    (tmp_path / "corpus" / "sub").mkdir()
    (tmp_path / "corpus" / "sub" / "table.csv").write_text("a,b")
    (tmp_path / "corpus" / ".hidden.csv").write_text("a,b")  # hidden files are not part of a corpus
    with caplog.at_level(logging.WARNING):
        assert len(load_corpus(cfg).texts()) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    skipped = f"skipped 2 files of unsupported type in {tmp_path / 'corpus'}: paper.pdf, sub/table.csv"
    assert warnings == [f"data.source: {skipped} (supported: .txt, .md, .rst, .jsonl, .json, .parquet, .arrow)"]


def test_a_folder_without_usable_files_is_an_error(tmp_path):
    root = tmp_path / "pdfs"
    root.mkdir()
    (root / "paper.pdf").write_bytes(b"%PDF")
    with pytest.raises(ValueError) as error:
        load_corpus(DataConfig(source=str(root), out_root=str(tmp_path / "out")))
    assert str(error.value) == (
        f"data.source: {root} has no files of a supported type (.txt, .md, .rst, .jsonl, .json, .parquet, .arrow); "
        "1 other file skipped"
    )
