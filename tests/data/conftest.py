import json

import pytest

from lrm_train.data import DataConfig
from lrm_train.data.prepare import prepare


def write_corpus(root):
    """Text files, a JSONL file, a Parquet file and an Arrow file: 13 documents in all."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        (root / f"doc{i}.txt").write_text(f"Document {i}.\n" + "To be, or not to be: that is the question. " * (20 + i))
    (root / "notes.md").write_text("# Notes\n\nUnicode survives: café, naïve, 😀, 東京.\n")
    with open(root / "records.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"text": f"Record {i}: " + "all the world's a stage " * (10 + i), "id": i}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"text": ["A parquet document about " + "kings " * 30, "Another one " * 25]}), root / "table.parquet"
    )
    schema = pa.schema([("text", pa.string())])
    with pa.OSFile(str(root / "more.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(pa.table({"text": ["An Arrow document: " + "exeunt omnes " * 12]}))
    return root


@pytest.fixture
def corpus_dir(tmp_path):
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def small_cfg(corpus_dir, tmp_path):
    return DataConfig(
        name="small",
        source=str(corpus_dir),
        out_root=str(tmp_path / "out"),
        vocab_size=400,
        val_fraction=0.2,
        num_proc=1,
        seq_len=16,
        shard_tokens=500,
    )


@pytest.fixture
def prepared(small_cfg):
    return prepare(small_cfg)
