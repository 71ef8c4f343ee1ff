"""Data pipeline throughput on the default corpus, next to what the tiny model consumes when it trains.

    python scripts/bench_data.py [--batch 8] [--seq-len 256]
    python scripts/bench_data.py --scale 5,20,80     # prepare generated corpora of these sizes (MB)
    python scripts/bench_data.py --startup 8         # open a 64-shard folder as 8 ranks in 2 processes

Prints: prepare (tokenizer training + parallel tokenization + shard writing) in tokens/s, the loader in tokens/s,
and the tiny model's training step (forward, backward, AdamW) in tokens/s on the same machine, with the ratio.
``--scale``: for each size, a fresh process prepares a generated corpus (JSON Lines and Parquet files of random
words) on one core; its peak RSS, CPU seconds and tokens per CPU second. ``--startup``: the wall time until every
rank has opened a 64-shard folder and read its rows of the first global batch (median of ``--repeat`` runs), with
every rank hashing every shard (verify_checksums before stamps) and with stamps (rank 0 checks sizes and stamps,
every rank opens without hashing and maps only the shards it reads, as the trainer does), and how many shards each
rank memory-mapped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lrm_train.data import BatchLoader, DataConfig, TokenData
from lrm_train.data.config import FORMAT, MANIFEST
from lrm_train.data.prepare import prepare
from lrm_train.data.tokenizer import available_cores
from lrm_train.data.verify import check_folder, verify_all, write_stamps
from lrm_train.models import FalconH1LM, preset
from lrm_train.nn import LRMConfig, lm_loss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--loader-steps", type=int, default=2000)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--scale", help="comma-separated corpus sizes in MB: prepare each in a fresh process")
    parser.add_argument("--sample-mb", type=int, default=4, help="data.tokenizer_sample_bytes for --scale, in MiB")
    parser.add_argument("--startup", type=int, metavar="RANKS", help="open a 64-shard folder as RANKS ranks")
    parser.add_argument("--shard-tokens", type=int, default=1 << 22, help="tokens per shard for --startup")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each --startup case (the median is shown)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.scale:
        return bench_scale([float(size) for size in args.scale.split(",")], args.sample_mb << 20)
    if args.startup:
        return bench_startup(args.startup, args.shard_tokens, args.repeat)

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        folder = prepare(DataConfig(out_root=tmp))
        prepare_seconds = time.perf_counter() - started
        manifest = json.loads((folder / "manifest.json").read_text())
        tokens = sum(split["tokens"] for split in manifest["splits"].values())

        loader = BatchLoader(TokenData(folder).splits["train"], args.seq_len, args.batch, seed=0)
        next(loader)
        started = time.perf_counter()
        for _ in range(args.loader_steps):
            next(loader)
        loader_rate = args.loader_steps * args.batch * args.seq_len / (time.perf_counter() - started)

        model = FalconH1LM(preset("tiny"), LRMConfig("full"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        times = []
        for step in range(args.train_steps + 1):
            inputs, targets = next(loader)
            started = time.perf_counter()
            lm_loss(model(inputs), targets).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:
                times.append(time.perf_counter() - started)
        train_rate = args.batch * args.seq_len * len(times) / sum(times)

    print(f"default corpus: {manifest['source']}, {tokens:,} tokens, vocab {manifest['tokenizer']['vocab_size']}")
    print(f"{'stage':<46}{'tokens/s':>14}")
    print(f"{'prepare (BPE training + tokenize + write)':<46}{tokens / prepare_seconds:>14,.0f}")
    tokenize_stage = f"  tokenize + write only (num_proc={available_cores()})"
    print(f"{tokenize_stage:<46}{tokens / manifest['tokenize_seconds']:>14,.0f}")
    loader_stage = f"loader (batch {args.batch} x {args.seq_len}, prefetch)"
    print(f"{loader_stage:<46}{loader_rate:>14,.0f}")
    print(f"{'tiny model training step (fwd+bwd+AdamW)':<46}{train_rate:>14,.0f}")
    print(f"loader / training = {loader_rate / train_rate:,.0f}x (target: >= 10x)")
    return 0


def write_corpus(root: Path, megabytes: float, seed: int = 0) -> None:
    """JSON Lines files of about 1 MB and one Parquet file in ten: documents of 50-800 random words drawn from a
    Zipf-like vocabulary of 20,000 made-up words, so the text's statistics do not change with the size."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(20_000)]
    weights = 1 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    root.mkdir(parents=True)
    written, index = 0, 0
    while written < megabytes * 1e6:
        docs = []
        while sum(len(d) for d in docs) < 1e6:
            docs.append(" ".join(words[i] for i in rng.choice(len(words), size=rng.integers(50, 800), p=weights)))
        if index % 10 == 9:
            pq.write_table(pa.table({"text": docs}), root / f"part{index:04d}.parquet")
        else:
            (root / f"part{index:04d}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        written, index = written + sum(len(d) for d in docs), index + 1


PREPARE_ONE = """
import json, sys
from lrm_train.data import DataConfig
from lrm_train.data.prepare import prepare
from lrm_train.data.tokenizer import available_cores
source, out, sample = sys.argv[1:]
folder = prepare(DataConfig(source=source, out_root=out, num_proc=1, tokenizer_sample_bytes=int(sample)))
manifest = json.loads((folder / "manifest.json").read_text())
print(sum(split["tokens"] for split in manifest["splits"].values()))
"""


def bench_scale(sizes: list[float], sample_bytes: int) -> int:
    print(f"prepare on one core (num_proc=1), vocab 8192, tokenizer sample {sample_bytes >> 20} MiB; load: {load()}")
    print(f"{'corpus':>10}{'tokens':>14}{'wall s':>9}{'CPU s':>9}{'tokens/CPU s':>15}{'peak RSS':>12}")
    for megabytes in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            write_corpus(Path(tmp) / "corpus", megabytes)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            run = [sys.executable, "-c", PREPARE_ONE, f"{tmp}/corpus", f"{tmp}/out", str(sample_bytes)]
            done = subprocess.run(run, capture_output=True, text=True, check=True)
            wall = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            tokens = int(done.stdout.split()[-1])
            # ru_maxrss of the children: the largest child so far, in KiB; each size runs after the smaller ones,
            # so a later line can only repeat an earlier peak, never hide a larger one.
            print(
                f"{megabytes:>8.0f}MB{tokens:>14,}{wall:>9.1f}{cpu:>9.1f}{tokens / cpu:>15,.0f}"
                f"{after.ru_maxrss / 1024:>9.0f}MiB"
            )
    return 0


def load() -> str:
    """The 1, 5 and 15 minute load averages (other users of the machine)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def write_shards(folder: Path, shards: int = 64, tokens: int = 1 << 20) -> None:
    """A prepared folder of ``shards`` random train shards (and one val shard), manifest and stamps as prepare writes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split, count in (("train", shards - 1), ("val", 1)):
        entries = []
        for i in range(count):
            data = rng.integers(0, 8192, size=tokens, dtype=np.uint16).tobytes()
            (folder / f"{split}_{i:05d}.bin").write_bytes(data)
            entries.append(
                {"file": f"{split}_{i:05d}.bin", "tokens": tokens, "sha256": hashlib.sha256(data).hexdigest()}
            )
        splits[split] = {"documents": 1, "tokens": tokens * count, "shards": entries}
    tokenizer = {"file": "tokenizer.json", "sha256": "", "vocab_size": 8192, "eos_id": 2}
    manifest = {"format": FORMAT, "dtype": "uint16", "splits": splits, "tokenizer": tokenizer}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    write_stamps(folder, manifest)


def open_as_ranks(folder: str, ranks: list[int], world_size: int, stamped: bool, mapped) -> None:
    """Start ``ranks`` of ``world_size`` as the trainer does: open the folder, read this rank's rows of step 0. Puts
    in ``mapped`` how many of the folder's shards each rank memory-mapped (from ``/proc/self/maps``: Linux)."""
    opened = []  # every rank's data stays open, so that the next rank's count is only its own
    for rank in ranks:
        before = mapped_files(folder)
        if not stamped:
            verify_all(folder)  # what every rank's open did before the stamps
        elif rank == 0:
            check_folder(folder)
        data = TokenData(folder)
        global_batch = STARTUP_ROWS_PER_RANK * world_size
        BatchLoader(data.splits["train"], 256, global_batch, rank, world_size, prefetch=0).batch(0)
        opened.append(data)
        mapped.put(mapped_files(folder) - before)


def mapped_files(folder: str) -> int:
    """How many memory maps of files in ``folder`` this process holds (one per ``np.memmap``)."""
    return sum(folder in line for line in Path("/proc/self/maps").read_text().splitlines())


STARTUP_ROWS_PER_RANK = 8


def bench_startup(ranks: int, shard_tokens: int, repeat: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        write_shards(folder, tokens=shard_tokens)
        size = sum(p.stat().st_size for p in folder.glob("*.bin"))
        print(
            f"{ranks} ranks in 2 processes open 64 shards ({size / 2**20:.0f} MiB) and read {STARTUP_ROWS_PER_RANK} "
            f"rows each; median of {repeat}; load: {load()}"
        )
        context = multiprocessing.get_context("fork")
        shares = [list(range(ranks))[i::2] for i in range(2)]
        for stamped, label in ((False, "every rank hashes every shard (before)"), (True, "stamps (now)")):
            times, mapped = [], context.SimpleQueue()
            for _ in range(repeat):
                started = time.perf_counter()
                args = [(str(folder), share, ranks, stamped, mapped) for share in shares]
                workers = [context.Process(target=open_as_ranks, args=a) for a in args]
                for worker in workers:
                    worker.start()
                for worker in workers:
                    worker.join()
                times.append(time.perf_counter() - started)
            counts = [mapped.get() for _ in range(repeat * ranks)]
            print(
                f"  {label:<42}{np.median(times):>8.3f} s (min {min(times):.3f}); "
                f"shards mapped per rank: {min(counts)} to {max(counts)}"
            )
    print(f"load after: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
