"""Byte-level BPE tokenizers: train one with ``tokenizers`` or load an existing tokenizer.json; encode in parallel."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
# Runs of non-space (or of space) characters longer than this are cut into pieces of this length before the
# byte-level split. BPE training rescans a whole "word" for every merge, so a single 5 MB word without whitespace
# (minified code, base64, a DNA string) took hours; no useful token is this long, and shorter runs are untouched.
MAX_RUN_CHARS = 64
# MAX_RUN_CHARS characters that more of the same kind follow: cut off as a pre-token of their own.
_LONG_RUN_PIECE = rf"\S{{{MAX_RUN_CHARS}}}(?=\S)|\s{{{MAX_RUN_CHARS}}}(?=\s)"
# How other tokenizers name their end-of-document token, most common first.
EOS_CANDIDATES = (EOS, "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


def train_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None) -> Tokenizer:
    """Byte-level BPE (no unknown tokens, exact round trip) with PAD, BOS and EOS as ids 0, 1, 2."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LONG_RUN_PIECE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    _in_daemon_thread(lambda: tokenizer.train_from_iterator(texts, trainer, length=length))
    return tokenizer


def _in_daemon_thread(work: Callable[[], None]) -> None:
    """Run ``work`` in a thread and wait for it, so that Ctrl-C interrupts the wait at once.

    BPE training runs in Rust for minutes on a large corpus without looking at signals. On Ctrl-C the thread is
    abandoned; being a daemon, it does not keep the process alive.
    """
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - re-raised in the waiting thread
            failure.append(e)

    thread = threading.Thread(target=run, name="bpe-training", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if failure:
        raise failure[0]


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"data.tokenizer: {path} is a folder, not a tokenizer.json file")
    if not path.is_file():
        raise FileNotFoundError(f"data.tokenizer: {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for malformed files
        raise ValueError(f"data.tokenizer: {path} is not a valid tokenizer.json ({e})") from None


def eos_id(tokenizer: Tokenizer, source: str) -> int:
    for token in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise ValueError(f"data.tokenizer: {source} has no end-of-document token (looked for {', '.join(EOS_CANDIDATES)})")


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def _encode(tokenizer: Tokenizer, dtype: np.dtype, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(encoding.ids, dtype=dtype) for encoding in tokenizer.encode_batch(texts)]


# A worker process's tokenizer and token dtype, set once when it starts.
_worker: tuple[Tokenizer, np.dtype] | None = None
_PR_SET_PDEATHSIG = 1  # from linux/prctl.h


def _start_worker(tokenizer_json: str, dtype: str, parent: int) -> None:
    global _worker
    if sys.platform == "linux":  # the kernel kills this worker when its parent dies, even by SIGKILL
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent handles it for all
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool stops its workers with SIGTERM, whatever the parent's
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # born blocked (batch_encoder): one sent since waits
    _worker = (Tokenizer.from_str(tokenizer_json), np.dtype(dtype))


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return _encode(*_worker, texts)


@contextlib.contextmanager
def batch_encoder(
    tokenizer: Tokenizer, dtype: np.dtype, num_proc: int
) -> Iterator[Callable[[Iterable[list[str]]], Iterator[list[np.ndarray]]]]:
    """A function from batches of texts to their token ids (an array per text), in order, in ``num_proc`` processes.

    The worker processes are forked and end with the block; on Linux they also die with this process, however it
    dies, so a killed prepare never leaves workers behind.
    """
    if num_proc == 1:
        yield lambda batches: (_encode(tokenizer, dtype, texts) for texts in batches)
        return
    # Each worker encodes on one thread: tokenizers turns its thread pool off in a forked process. The workers are
    # born with SIGTERM blocked (the mask survives fork) until their handler is the default: a SIGTERM that reached a
    # child before Python's after-fork reset went to the parent's handler and was dropped by that reset, so a pool
    # terminated right after it started (a prepare failing on its first document) waited forever for that worker.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        pool = multiprocessing.get_context("fork").Pool(
            num_proc, initializer=_start_worker, initargs=(tokenizer.to_str(), dtype.str, os.getpid())
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    with pool:  # terminates the workers, also when the block is interrupted
        yield lambda batches: _in_order(pool, batches, IN_FLIGHT_PER_PROC * num_proc)


# Batches handed to the workers and not yet collected, per worker: enough to keep each one busy. Pool.imap would read
# the whole input ahead into its task queue (no back-pressure), so a corpus larger than memory would not fit.
IN_FLIGHT_PER_PROC = 4


def _in_order(pool, batches: Iterable[list[str]], in_flight: int) -> Iterator[list[np.ndarray]]:
    """``pool``'s encodings of ``batches``, in order, with at most ``in_flight`` batches read ahead."""
    pending: collections.deque = collections.deque()
    for texts in batches:
        pending.append(pool.apply_async(_encode_in_worker, (texts,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask under Slurm or taskset, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
