import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lrm_train.data import BatchLoader, TokenData, validation_batches, validation_windows
from lrm_train.data.prepare import prepare
from lrm_train.data.verify import check_folder


def loader(prepared, **kwargs):
    split = TokenData(prepared).splits["train"]
    return BatchLoader(split, **{"seq_len": 16, "global_batch": 8, "seed": 3, **kwargs})


def test_windows_are_inputs_and_shifted_targets(prepared):
    data = TokenData(prepared)
    it = loader(prepared, global_batch=64, prefetch=0)
    inputs, targets = it.batch(0)
    assert inputs.shape == targets.shape == (64, 16) and inputs.dtype == torch.int64
    # Contiguous: a pinned view with strides would make .to(cuda, non_blocking=True) stage through pageable memory.
    assert inputs.is_contiguous() and targets.is_contiguous()
    stream = torch.from_numpy(data.splits["train"].read(0, data.splits["train"].num_tokens).astype(np.int64))
    for window, x, y in zip(it.window_ids(0), inputs, targets):  # windows that cross shard boundaries included
        assert torch.equal(x, stream[window * 16 : window * 16 + 16])
        assert torch.equal(y, stream[window * 16 + 1 : window * 16 + 17])


def test_ranks_are_disjoint_and_cover_the_global_batch_for_any_world_size(prepared):
    for step in (0, 5, 40):  # step 40 runs past the first epoch
        whole = loader(prepared, prefetch=0).batch(step)[0]
        for world in (2, 4, 8):
            parts = [loader(prepared, rank=r, world_size=world, prefetch=0).batch(step)[0] for r in range(world)]
            assert torch.equal(torch.cat(parts), whole)
        ids = loader(prepared).window_ids(step)
        assert len(set(ids.tolist())) == len(ids)


def test_epochs_visit_every_window_once(prepared):
    it = loader(prepared, global_batch=1, prefetch=0)
    ids = [int(it.window_ids(step)[0]) for step in range(it.num_windows)]
    assert sorted(ids) == list(range(it.num_windows))


def test_deterministic_and_seed_dependent(prepared):
    a, b, c = loader(prepared), loader(prepared), loader(prepared, seed=4)
    first = [next(a)[0] for _ in range(5)]
    assert all(torch.equal(x, next(b)[0]) for x in first)
    assert not all(torch.equal(x, next(c)[0]) for x in first)


def test_resume_sees_exactly_the_batches_of_an_uninterrupted_run(prepared):
    uninterrupted = loader(prepared)
    expected = [next(uninterrupted) for _ in range(12)]
    first = loader(prepared)
    for _ in range(7):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives serialization
    resumed = loader(prepared, rank=0, world_size=2)  # even on another world size: its share of the same batches
    resumed.load_state_dict(state)
    for step in range(7, 12):
        inputs, targets = next(resumed)
        assert torch.equal(inputs, expected[step][0][:4]) and torch.equal(targets, expected[step][1][:4])
    with pytest.raises(ValueError, match="seed=3, this run has 9"):
        loader(prepared, seed=9).load_state_dict(state)


def test_validation_windows_are_fixed_and_split_across_ranks(prepared):
    split = TokenData(prepared).splits["val"]
    starts = validation_windows(split, 16, 10)
    assert len(starts) == min(10, (split.num_tokens - 1) // 16) and len(set(starts.tolist())) == len(starts)
    whole = torch.cat([x for x, _ in validation_batches(split, 16, 10, batch_size=3)])
    shares = [torch.cat([x for x, _ in validation_batches(split, 16, 10, 3, rank=r, world_size=2)]) for r in (0, 1)]
    assert sorted(map(tuple, whole.tolist())) == sorted(map(tuple, torch.cat(shares).tolist()))


def test_seq_len_longer_than_validation_split(prepared):
    split = TokenData(prepared).splits["val"]
    with pytest.raises(ValueError, match=f"data.seq_len={split.num_tokens} is longer than the validation split"):
        validation_windows(split, split.num_tokens, 4)


def test_shard_size_or_checksum_mismatch_is_refused_by_name(prepared):
    shard = prepared / "train_00001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="train_00001.bin: checksum does not match manifest.json"):
        check_folder(prepared)  # what rank 0 runs before the ranks open the folder
    split = TokenData(prepared).splits["train"]
    split.read(0, split.num_tokens)  # a rank checks the shards it reads by size only, and the size still matches
    shard.write_bytes(bytes(data[:-2]))
    for check in (check_folder, lambda folder: TokenData(folder).splits["train"].read(0, split.num_tokens)):
        with pytest.raises(ValueError, match=r"train_00001.bin: \d+ bytes, manifest.json says \d+"):
            check(prepared)
    shard.unlink()
    for check in (check_folder, lambda folder: TokenData(folder).splits["train"].read(0, split.num_tokens)):
        with pytest.raises(FileNotFoundError, match="train_00001.bin: shard listed in manifest.json is missing"):
            check(prepared)


def test_missing_or_corrupt_manifest(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="run python -m lrm_train.data.prepare first"):
        TokenData(tmp_path)
    (prepared / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: not a valid token manifest"):
        TokenData(prepared)


def test_a_rank_opens_only_the_shards_its_rows_read(small_cfg, monkeypatch):
    folder = prepare(replace(small_cfg, shard_tokens=64))  # dozens of shards, a few windows each
    check_folder(folder)  # rank 0's check, before the ranks open the folder
    shards = json.loads((folder / "manifest.json").read_text())["splits"]["train"]["shards"]
    touched = []
    memmap, stat = np.memmap, Path.stat
    monkeypatch.setattr(np, "memmap", lambda path, *a, **k: touched.append(Path(path).name) or memmap(path, *a, **k))
    monkeypatch.setattr(Path, "stat", lambda self, *a, **k: touched.append(self.name) or stat(self, *a, **k))

    it = BatchLoader(TokenData(folder).splits["train"], 16, 8, 1, 4, seed=3, prefetch=0)
    assert not [name for name in touched if name.endswith(".bin")]  # opening the folder reads the manifest only
    it.batch(0)
    ends = np.cumsum([shard["tokens"] for shard in shards])
    needed = set()
    for window in it.window_ids(0)[it.rows]:  # rank 1 of 4: rows 2 and 3, each seq_len + 1 tokens
        first, last = np.searchsorted(ends, [window * 16, window * 16 + 16], side="right")
        needed |= {shard["file"] for shard in shards[first : last + 1]}
    assert {name for name in touched if name.endswith(".bin")} == needed
    assert len(needed) <= 4 < len(shards)
