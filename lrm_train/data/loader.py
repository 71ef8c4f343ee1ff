"""Reading prepared token folders: verified memmapped splits, the resumable distributed batch loader, validation.

Data order: a split of N tokens holds ``W = (N - 1) // seq_len`` windows of ``seq_len + 1`` tokens (inputs and
targets shifted by one), window w starting at token ``w * seq_len``. Global position ``p = step * global_batch + i``
reads window ``permutation_e[p mod W]`` with ``e = p div W`` and ``permutation_e`` a fixed function of (seed, e).
So the global batch of a step depends only on (seed, step): not on the world size, the rank or gradient accumulation.
Rank r of R reads rows ``[r * global_batch / R, (r + 1) * global_batch / R)`` of it. Resuming needs only the step.
Several weighted splits (``data.mixture``) keep these properties: see ``mixture.py``.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from lrm_train.data.config import FORMAT, MANIFEST


def read_manifest(folder: Path) -> dict:
    """``folder``'s manifest, or one error line naming it (missing, not JSON, another format, a field missing)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (run python -m lrm_train.data.prepare first)")
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest["dtype"] not in ("uint16", "uint32"):
            raise ValueError(f"dtype {manifest['dtype']!r}")
        shards = [shard for split in manifest["splits"].values() for shard in split["shards"]]
        if not all(isinstance(shard["file"], str) and isinstance(shard["tokens"], int) for shard in shards):
            raise ValueError("a shard's file is not a string or its token count not an integer")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid token manifest ({e})") from None
    return manifest


def check_size(path: Path, shard: dict, itemsize: int) -> None:
    """Refuse, by name, a shard that is missing or whose size is not its manifest entry's."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard listed in {MANIFEST} is missing")
    expected = shard["tokens"] * itemsize
    if path.stat().st_size != expected:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, {MANIFEST} says {expected}")


class TokenSplit:
    """One split's shards as a single read-only token sequence.

    A shard is checked (present, of its manifest size) and memory-mapped when it is first read, not before: a rank
    opens only the shards its rows touch, a few of a folder's thousands (its integrity was checked once, on rank 0:
    ``verify.check_folder``). The prefetch thread reads too, hence the lock around opening."""

    def __init__(self, folder: Path, split: dict, dtype: np.dtype) -> None:
        self.folder, self.dtype, self.specs = folder, dtype, split["shards"]
        self.starts = np.cumsum([0] + [int(shard["tokens"]) for shard in self.specs])
        self.num_tokens = int(self.starts[-1])
        self._open: dict[int, np.memmap] = {}
        self._lock = threading.Lock()

    def shard(self, index: int) -> np.memmap:
        """Shard ``index``'s tokens, checked and mapped on first use (it holds at least one token)."""
        if (tokens := self._open.get(index)) is None:
            with self._lock:
                if (tokens := self._open.get(index)) is None:
                    path = self.folder / self.specs[index]["file"]
                    check_size(path, self.specs[index], self.dtype.itemsize)
                    tokens = self._open[index] = np.memmap(path, dtype=self.dtype, mode="r")
        return tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)``, across shard boundaries if needed."""
        index = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces, end = [], start + length
        while index < len(self.specs) and self.starts[index] < end:
            lo, hi = max(start, self.starts[index]), min(end, self.starts[index + 1])
            if lo < hi:  # an empty shard holds nothing to read (and no file to map)
                pieces.append(self.shard(index)[lo - self.starts[index] : hi - self.starts[index]])
            index += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class TokenData:
    """A prepared folder (see ``prepare``): its manifest, and its splits, whose shards are checked by size and mapped
    as they are first read (``TokenSplit``). Checking every shard (and the hashes) is ``verify.check_folder``'s job,
    done once before the ranks of a run open the folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        dtype = np.dtype(self.manifest["dtype"])
        self.splits = {name: TokenSplit(self.folder, spec, dtype) for name, spec in self.manifest["splits"].items()}
        self.vocab_size = int(self.manifest["tokenizer"]["vocab_size"])
        self.eos_id = int(self.manifest["tokenizer"]["eos_id"])

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / self.manifest["tokenizer"]["file"]


def _windows(split: TokenSplit, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _rows([split.read(int(s), seq_len + 1) for s in starts])


def _rows(windows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.from_numpy(np.stack(windows).astype(np.int64))
    # Contiguous copies, not views: a pinned tensor keeps its strides, and a strided source makes the non_blocking
    # copy to the GPU stage through pageable memory (a host sync), which is what pinning is meant to avoid.
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def count_windows(split: TokenSplit, seq_len: int, what: str = "the training split") -> int:
    """How many windows of ``seq_len + 1`` tokens ``split`` holds (at least one, or a ValueError naming ``what``)."""
    count = (split.num_tokens - 1) // seq_len
    if count < 1:
        raise ValueError(f"data.seq_len={seq_len} is longer than {what} ({split.num_tokens} tokens)")
    return count


class WindowOrder:
    """Position ``p`` of one split's stream of windows -> window ``permutation_e[p mod W]``, ``e = p div W``, where
    ``permutation_e`` is seeded by ``key + [e]``. One permutation is cached (shared with the prefetch thread)."""

    def __init__(self, num_windows: int, key: list[int]) -> None:
        self.num_windows, self.key = num_windows, key
        self._epoch, self._permutation = -1, np.empty(0, dtype=np.int64)
        self._lock = threading.Lock()

    def windows(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(positions // self.num_windows):
            here = positions // self.num_windows == epoch
            out[here] = self._epoch_permutation(int(epoch))[positions[here] % self.num_windows]
        return out

    def _epoch_permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch != self._epoch:
                rng = np.random.default_rng([*self.key, epoch])
                self._permutation, self._epoch = rng.permutation(self.num_windows), epoch
            return self._permutation


class BatchLoader:
    """Yields this rank's share of each global batch as (inputs, targets) [global_batch / world, seq_len] int64.

    Subclasses read other orders (``mixture.MixtureLoader``) by giving ``sources`` and ``sample``."""

    def __init__(
        self,
        split: TokenSplit,
        seq_len: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        prefetch: int = 2,
        pin_memory: bool = False,
    ) -> None:
        self.num_windows = count_windows(split, seq_len)
        self.sources, self.orders = [split], [WindowOrder(self.num_windows, [seed])]
        self._init_reader(seq_len, global_batch, rank, world_size, seed, prefetch, pin_memory)

    def _init_reader(
        self, seq_len: int, global_batch: int, rank: int, world_size: int, seed: int, prefetch: int, pin_memory: bool
    ) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the world size {world_size}")
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.rows = slice(rank * global_batch // world_size, (rank + 1) * global_batch // world_size)
        self.step = 0
        self.prefetch = prefetch
        # Pinned batches let the step copy them to the GPU without waiting (``non_blocking``); pinned in the prefetch
        # thread, off the step's path.
        self.pin_memory = pin_memory
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-prefetch") if prefetch else None
        self._pending: dict[int, Future] = {}

    def sample(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index, window index) of each row of the global batch of ``step``, the same on every rank."""
        return self.source_ids(step), self.window_ids(step)

    def source_ids(self, step: int) -> np.ndarray:
        """The source index of each row of the global batch of ``step`` (cheap: reads no permutation)."""
        return np.zeros(self.global_batch, dtype=np.int64)

    def window_ids(self, step: int) -> np.ndarray:
        """Window indices of the whole global batch of ``step`` (the same on every rank and world size)."""
        return self.orders[0].windows(step * self.global_batch + np.arange(self.global_batch))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        sources, windows = (ids[self.rows] for ids in self.sample(step))
        length, splits = self.seq_len + 1, self.sources
        inputs, targets = _rows([splits[k].read(int(w) * self.seq_len, length) for k, w in zip(sources, windows)])
        return (inputs.pin_memory(), targets.pin_memory()) if self.pin_memory else (inputs, targets)

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.step
        future = self._pending.pop(step, None)
        batch = future.result() if future is not None else self.batch(step)
        self.step += 1
        if self._pool is not None:
            for ahead in range(self.step, self.step + self.prefetch):
                if ahead not in self._pending:
                    self._pending[ahead] = self._pool.submit(self.batch, ahead)
        return batch

    def mixture(self) -> dict[str, float] | None:
        """The sources' names and normalised weights; None for one split (``data.source``)."""
        return None

    def state_dict(self) -> dict:
        state = {"step": self.step, "seed": self.seed, "seq_len": self.seq_len, "global_batch": self.global_batch}
        return state if self.mixture() is None else {**state, "mixture": self.mixture()}

    def load_state_dict(self, state: dict) -> None:
        # The data order is a function of these: resuming with another would silently repeat or skip data.
        for key, config_key in (("seed", "train.seed"), ("seq_len", "data.seq_len"), ("global_batch", "global batch")):
            if state[key] != getattr(self, key):
                raise ValueError(f"trained with {config_key}={state[key]}, this run has {getattr(self, key)}")
        if state.get("mixture") != self.mixture():
            saved, this = (_describe(m) for m in (state.get("mixture"), self.mixture()))
            raise ValueError(f"trained with data.mixture={saved}, this run has {this}")
        self._pending.clear()
        self.step = int(state["step"])


def _describe(mixture: dict[str, float] | None) -> str:
    return (
        "unset (data.source)" if mixture is None else "[" + ", ".join(f"{k}: {w:.4g}" for k, w in mixture.items()) + "]"
    )


def validation_windows(split: TokenSplit, seq_len: int, max_windows: int) -> np.ndarray:
    """Start offsets of the fixed validation windows: evenly spread over the split, the same for every run."""
    available = count_windows(split, seq_len, "the validation split")
    count = min(available, max_windows)
    return np.linspace(0, available - 1, count).round().astype(np.int64) * seq_len


def validation_batches(
    split: TokenSplit, seq_len: int, max_windows: int, batch_size: int, rank: int = 0, world_size: int = 1
):
    """This rank's disjoint share of the fixed validation windows, in batches of at most ``batch_size``."""
    starts = validation_windows(split, seq_len, max_windows)[rank::world_size]
    for i in range(0, len(starts), batch_size):
        yield _windows(split, starts[i : i + batch_size], seq_len)
