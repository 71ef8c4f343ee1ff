"""Stream, don't load: sources are read a record batch, a line or a file at a time, never through the datasets cache;
the tokenizer workers get a bounded window of batches; the BPE learns from a bounded sample spread over the files."""

import json
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lrm_train.data import DataConfig
from lrm_train.data import tokenizer as tokenizer_module
from lrm_train.data.prepare import tokenizer_sample
from lrm_train.data.sources import load_corpus


@pytest.mark.multiprocess
def test_a_local_source_is_prepared_without_datasets(corpus_dir, tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        from lrm_train.data import DataConfig
        from lrm_train.data.prepare import prepare
        prepare(DataConfig(source={str(corpus_dir)!r}, out_root={str(tmp_path / "out")!r}, vocab_size=300, num_proc=1))
        print("datasets" in sys.modules)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]  # no copy into (nor import of) the datasets cache


def test_parquet_and_arrow_are_read_by_record_batches(tmp_path, monkeypatch):
    root = tmp_path / "tables"
    root.mkdir()
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(50)]}), root / "a.parquet", row_group_size=10)
    with pa.OSFile(str(root / "b.arrow"), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("text", pa.string())])) as w:
        for start in range(0, 30, 10):
            w.write_table(pa.table({"text": [f"arrow {i}" for i in range(start, start + 10)]}))

    def whole_table(*args, **kwargs):
        raise AssertionError("a whole table was read")

    monkeypatch.setattr(pq, "read_table", whole_table)
    monkeypatch.setattr(pq.ParquetFile, "read", whole_table)
    monkeypatch.setattr(pa.ipc.RecordBatchFileReader, "read_all", whole_table)
    corpus = load_corpus(DataConfig(source=str(root)))
    documents = list(corpus.documents())
    assert [text for _, text in documents] == [f"row {i}" for i in range(50)] + [f"arrow {i}" for i in range(30)]
    assert documents[0][0] == "a.parquet:0" and documents[-1][0] == "b.arrow:29"  # keys: file and record number


class InstantPool:
    def apply_async(self, function, args):
        class Done:
            def get(self):
                return args[0]

        return Done()


def test_the_encoder_reads_only_a_bounded_window_ahead():
    read = 0

    def batches():
        nonlocal read
        for i in range(100):
            read += 1
            yield [str(i)]

    ahead = []
    for produced, _ in enumerate(tokenizer_module._in_order(InstantPool(), batches(), in_flight=3), 1):
        ahead.append(read - produced)
    assert len(ahead) == 100 and max(ahead) <= 2  # Pool.imap would have read all 100 first


def test_the_tokenizer_sample_is_bounded_and_spread_over_every_file(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(20):
        lines = [json.dumps({"text": f"file {i} doc {j} " + "x" * 80}) for j in range(50)]
        (root / f"f{i:02d}.jsonl").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source=str(root), tokenizer_sample_bytes=10_000, val_fraction=0.1)
    sample = list(tokenizer_sample(load_corpus(cfg), cfg))
    assert 9_000 <= sum(len(t.encode()) for t in sample) <= 10_000 + 20 * 100  # one document over per file at most
    assert {text.split()[1] for text in sample} == {str(i) for i in range(20)}  # every file contributes
    cfg.tokenizer_sample_bytes = 10**9  # larger than the corpus: every training document
    assert len(list(tokenizer_sample(load_corpus(cfg), cfg))) > 0.8 * 20 * 50
