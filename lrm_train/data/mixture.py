"""Weighted data mixtures (``data.mixture``): several prepared folders read as one stream of global batches.

Which source a row reads is a stratified quota, not a random draw. The rows of all global batches form one stream of
positions ``p = step * global_batch + i``; ``assign`` gives each position a source ``k`` and its index ``j`` among
source k's positions, and source k's ``j``-th row reads window ``permutation_{k,e}[j mod W_k]``, ``e = j div W_k``,
with ``permutation_{k,e}`` seeded by (seed, k, e). The seed picks the windows; which rows take which source is a
fixed pattern of the weights alone. Why this design:

- The order is a closed-form function of (seed, step): no history to replay, so a resume needs the step alone and
  costs the same at step 10 as at step 10 million, and the global batch is the same at any world size and gradient
  accumulation (rank r reads its rows of it, as with one source).
- Each source has its own epochs: one source wrapping around (a small corpus seen many times) leaves the others' order
  alone.
- The counts are exact up to rounding: among the first P positions, source k holds ``w_k * P`` rows within K / 2
  (K sources), where i.i.d. draws would wander by ``sqrt(P w_k (1 - w_k))``; and a source's rows are spread evenly
  through each batch, so every rank and micro-batch (and the prefix a batch ramp trains on) gets its share.

``assign`` rounds by stick-breaking: the source of least weight takes ``floor(v * n + 1/2)`` of the first n positions
(``v``: its share of the weights left), which rises by 0 or 1 per position, so its positions are where it rises and
``j`` is its value there; the other positions form the stream of the sources left, which the next source splits the
same way. Taking the lightest first keeps every ``v <= 1/2``, so floating-point rounding can never make a count jump
by two.
"""

from __future__ import annotations

import numpy as np

from lrm_train.data.loader import BatchLoader, TokenData, TokenSplit, WindowOrder, count_windows


def assign(positions: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The source of each position of the stream and its index among that source's positions (see the module)."""
    order = np.argsort(weights, kind="stable")
    left = np.cumsum(weights[order][::-1])[::-1]  # left[i]: the weight of the sources order[i:], not yet split off
    source = np.full(len(positions), order[-1], dtype=np.int64)  # what the others do not take is the heaviest's
    index = np.asarray(positions, dtype=np.int64).copy()  # position in the stream still being split
    open_rows = np.arange(len(positions))
    for level, k in enumerate(order[:-1]):
        share, n = weights[k] / left[level], index[open_rows]
        before, through = np.floor(share * n + 0.5), np.floor(share * (n + 1) + 0.5)
        taken = through > before
        source[open_rows[taken]] = k
        index[open_rows] = np.where(taken, before, n - before).astype(np.int64)
        open_rows = open_rows[~taken]
    return source, index


def check_same_tokenizer(sources: dict[str, TokenData]) -> None:
    """Every source must be tokenized alike: one line names the first folder whose tokenizer differs."""
    (first_name, first), *others = sources.items()
    expected = first.manifest["tokenizer"]["sha256"]
    for name, data in others:
        if data.manifest["tokenizer"]["sha256"] != expected:
            raise ValueError(
                f"data.mixture source {name} ({data.folder}) has another tokenizer than {first_name} "
                f"({first.folder}): prepare it with data.tokenizer={first.tokenizer_path}"
            )


class MixtureLoader(BatchLoader):
    """``BatchLoader`` over several training splits, each row's source given by ``assign`` (see the module)."""

    def __init__(
        self,
        splits: dict[str, TokenSplit],
        weights: list[float],
        seq_len: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        prefetch: int = 2,
        pin_memory: bool = False,
    ) -> None:
        self.names, self.sources = list(splits), list(splits.values())
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.orders = [
            WindowOrder(count_windows(split, seq_len, f"the training split of data.mixture source {name}"), [seed, k])
            for k, (name, split) in enumerate(splits.items())
        ]
        self._init_reader(seq_len, global_batch, rank, world_size, seed, prefetch, pin_memory)

    def source_ids(self, step: int) -> np.ndarray:
        return self._assign(step)[0]

    def sample(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        sources, index = self._assign(step)
        windows = np.empty_like(index)
        for k, order in enumerate(self.orders):
            rows = sources == k
            windows[rows] = order.windows(index[rows])
        return sources, windows

    def _assign(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        return assign(step * self.global_batch + np.arange(self.global_batch), self.weights)

    def mixture(self) -> dict[str, float]:
        return dict(zip(self.names, self.weights.tolist()))
