import os
import random
import signal
import string
import threading
import time

import pytest
from tokenizers import pre_tokenizers

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


def test_ctrl_c_stops_bpe_training_at_once():
    # Training runs in Rust without looking at signals; this takes ~4 s on 2 cores when left alone.
    texts = [random_run(1_000_000, seed=1), random_run(1_000_000, seed=2)]
    # Ctrl-C raises KeyboardInterrupt even where pytest was started in the background (which ignores SIGINT).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    started = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            train_bpe(texts, vocab_size=8000)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.perf_counter() - started < 1.5
