import os
import random
import signal
import string
import subprocess
import sys
import time

import numpy as np
from tokenizers import pre_tokenizers

from lrm_train.data import tokenizer as tokenizer_module
from lrm_train.data.tokenizer import MAX_RUN_CHARS, train_bpe


def random_run(length: int, seed: int = 0) -> str:
    return "".join(random.Random(seed).choices(string.ascii_letters, k=length))


def test_a_huge_run_without_whitespace_trains_and_encodes_in_seconds():
    # Unsplit, BPE training on one 300k-character "word" took minutes (each merge rescans the whole word).
    run = random_run(300_000)
    started = time.perf_counter()
    tokenizer = train_bpe(["an ordinary document, with words and spaces " * 20, run], vocab_size=2000)
    encoded = tokenizer.encode(run)
    assert time.perf_counter() - started < 20
    assert tokenizer.decode(encoded.ids) == run


def test_long_runs_are_split_and_ordinary_text_is_pre_tokenized_as_before():
    tokenizer = train_bpe(["some text to learn from"], vocab_size=300)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ordinary = "Hello  world, it's 2024!\n\tIndented: café 東京 " + "x" * MAX_RUN_CHARS + "\n" + " " * 30 + "end"
    assert tokenizer.pre_tokenizer.pre_tokenize_str(ordinary) == byte_level.pre_tokenize_str(ordinary)
    pieces = [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str("y" * (5 * MAX_RUN_CHARS + 3))]
    assert [len(p) for p in pieces] == [MAX_RUN_CHARS] * 5 + [3]
    spaces = [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str("a" + " " * (3 * MAX_RUN_CHARS) + "b")]
    assert max(len(p) for p in spaces) <= MAX_RUN_CHARS + 1


# Ctrl-C lands 0.5 s into a training that takes ~4 s on 2 cores when left alone. The child process ends with the
# training thread it abandons: left running inside pytest, that thread overlapped later tests and once crashed the run.
CTRL_C_DURING_TRAINING = """
import os, random, signal, string, threading, time
from lrm_train.data.tokenizer import train_bpe
texts = ["".join(random.Random(seed).choices(string.ascii_letters, k=1_000_000)) for seed in (1, 2)]
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
started = time.perf_counter()
try:
    train_bpe(texts, vocab_size=8000)
except KeyboardInterrupt:
    print(f"interrupted after {time.perf_counter() - started:.3f} s")
"""


def test_ctrl_c_stops_bpe_training_at_once():
    # A handler gives the child Ctrl-C's default even where pytest was started in the background (ignoring SIGINT).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        child = subprocess.run(
            [sys.executable, "-c", CTRL_C_DURING_TRAINING], capture_output=True, text=True, timeout=60
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert child.returncode == 0, child.stderr
    assert child.stdout.startswith("interrupted after "), child.stdout + child.stderr
    assert float(child.stdout.split()[2]) < 1.5


def test_encoding_workers_are_born_with_sigterm_blocked_until_their_handler_is_the_default(monkeypatch, tmp_path):
    """batch_encoder's workers: a SIGTERM from the pool's terminate() that reached a child before Python's after-fork
    reset was dropped by it (a prepare that failed on its first document then hung in Pool.terminate, seen in CI), so
    each starts with SIGTERM blocked, pending if sent, and unblocks it once its handler is the default. (The race
    itself cannot be timed in a test; this checks the mechanism that closes it.)"""
    start_worker = tokenizer_module._start_worker

    def recording(*args):
        blocked_at_birth = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        start_worker(*args)
        blocked_after = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        default = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        record = tmp_path / f"{os.getpid()}.partial"
        record.write_text(f"{blocked_at_birth} {blocked_after} {default}")
        record.rename(record.with_suffix(".txt"))

    monkeypatch.setattr(tokenizer_module, "_start_worker", recording)
    tokenizer = train_bpe(["some text to learn from"], vocab_size=300)
    with tokenizer_module.batch_encoder(tokenizer, np.dtype(np.uint16), 2) as encode:
        [ids] = next(encode([["some text"]]))
        # one batch needs one worker: the other may still be starting, and leaving would terminate it unrecorded
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("*.txt"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert tokenizer.decode(ids.tolist()) == "some text"
    assert sorted(p.read_text() for p in tmp_path.glob("*.txt")) == ["True False True"] * 2
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the parent's mask is back
