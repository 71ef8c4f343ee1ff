"""Weighted mixtures: the stratified assignment, the loader's order (world sizes, resume, per-source epochs), the
tokenizer check and the config's one-line errors."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from lrm_train.config_compose import compose_saved
from lrm_train.data import BatchLoader, TokenData
from lrm_train.data.mixture import MixtureLoader, assign, check_same_tokenizer
from lrm_train.data.prepare import compose as prepare_compose
from lrm_train.data.prepare import prepare
from lrm_train.train import compose
from lrm_train.train.config import RunConfig


@pytest.fixture
def other(small_cfg, prepared, tmp_path):
    """A second corpus (a few short plays' worth of text: fewer windows than the first) with the first's tokenizer."""
    root = tmp_path / "other"
    root.mkdir()
    for i in range(4):
        (root / f"play{i}.txt").write_text(f"Act {i}.\n" + "Now is the winter of our discontent. " * (8 + 2 * i))
    return prepare(replace(small_cfg, name="other", source=str(root), tokenizer=str(prepared / "tokenizer.json")))


def mixture(prepared, other, weights=(1.0, 3.0), **kwargs):
    splits = {"small": TokenData(prepared).splits["train"], "other": TokenData(other).splits["train"]}
    return MixtureLoader(splits, list(weights), **{"seq_len": 16, "global_batch": 8, "seed": 3, **kwargs})


@pytest.mark.parametrize("weights", [[1], [0.3, 0.7], [1, 1], [0.2, 0.3, 0.5], [1e-3, 1, 5], [1, 1, 1]])
def test_assign_is_each_sources_running_count_within_rounding(weights):
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    positions = np.arange(20_000)
    sources, index = assign(positions, weights)
    for k, weight in enumerate(weights):
        mine = sources == k
        # The j-th position of source k has index j: what replaying the whole stream would count, computed without it.
        assert np.array_equal(index[mine], np.arange(mine.sum()))
        error = np.abs(np.cumsum(mine) - weight * (positions + 1))
        assert error.max() <= len(weights) / 2  # stratified: within rounding at every prefix, not sqrt(P) wander
    # Any slice of the stream alone (a resumed step) gives what the whole stream gave there.
    late = np.arange(12_345, 12_400)
    assert all(np.array_equal(a, b[late]) for a, b in zip(assign(late, weights), (sources, index)))


def test_assign_far_into_a_run_is_exact():
    weights = np.array([0.25, 0.75])
    step, batch = 10**9, 1024  # a billion steps of 1024 rows: no history to replay, and no rounding slip
    sources, index = assign(step * batch + np.arange(batch), weights)
    assert np.bincount(sources).tolist() == [256, 768]
    assert index[sources == 0][0] == step * 256 and index[sources == 1][0] == step * 768


def test_rows_read_their_sources_windows(prepared, other):
    it = mixture(prepared, other, prefetch=0)
    streams = [split.read(0, split.num_tokens).astype(np.int64) for split in it.sources]
    for step in (0, 7):
        inputs, targets = it.batch(step)
        for source, window, x, y in zip(*it.sample(step), inputs, targets):
            stream = torch.from_numpy(streams[source])
            assert torch.equal(x, stream[window * 16 : window * 16 + 16])
            assert torch.equal(y, stream[window * 16 + 1 : window * 16 + 17])


def test_ranks_split_the_same_global_batch_at_any_world_size(prepared, other):
    for step in (0, 5, 60):  # step 60 is past several epochs of the smaller source
        whole = mixture(prepared, other, prefetch=0).batch(step)[0]
        for world in (2, 4, 8):
            parts = [
                mixture(prepared, other, rank=r, world_size=world, prefetch=0).batch(step)[0] for r in range(world)
            ]
            assert torch.equal(torch.cat(parts), whole)


def test_each_source_keeps_its_own_epochs(prepared, other):
    it = mixture(prepared, other, weights=(1.0, 1.0), prefetch=0)
    small_windows, other_windows = (order.num_windows for order in it.orders)
    assert other_windows < small_windows
    reads = {0: [], 1: []}
    for step in range(2 * small_windows // 4 + 1):  # 4 rows of each source per step: two epochs of the larger one
        for source, window in zip(*it.sample(step)):
            reads[int(source)].append(int(window))
    for k, count in ((0, small_windows), (1, other_windows)):
        for epoch in range(len(reads[k]) // count):  # every window once per epoch of its own source
            assert sorted(reads[k][epoch * count : (epoch + 1) * count]) == list(range(count))
    # The larger source's order is its own permutation, whatever the smaller one's epochs did meanwhile.
    alone = np.random.default_rng([3, 0, 0]).permutation(small_windows)
    assert reads[0][:small_windows] == alone.tolist()


def test_shares_match_the_weights(prepared, other):
    it = mixture(prepared, other, weights=(1.0, 3.0), global_batch=12)
    counts = np.bincount(np.concatenate([it.source_ids(step) for step in range(500)]), minlength=2)
    # 6000 rows: i.i.d. draws would be off by ~34 rows (one standard deviation); the quota is off by at most one.
    assert abs(counts[0] - 0.25 * counts.sum()) <= 1
    assert it.mixture() == {"small": 0.25, "other": 0.75}


def test_resume_sees_exactly_the_batches_of_an_uninterrupted_run(prepared, other):
    uninterrupted = mixture(prepared, other)
    expected = [next(uninterrupted) for _ in range(12)]
    first = mixture(prepared, other)
    for _ in range(7):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives serialization
    resumed = mixture(prepared, other, rank=1, world_size=2)  # on another world size: its share of the same batches
    resumed.load_state_dict(state)
    for step in range(7, 12):
        inputs, targets = next(resumed)
        assert torch.equal(inputs, expected[step][0][4:]) and torch.equal(targets, expected[step][1][4:])


def test_resume_refuses_another_mixture(prepared, other):
    state = mixture(prepared, other).state_dict()
    with pytest.raises(ValueError, match=r"data.mixture=\[small: 0.25, other: 0.75\], this run has \[small: 0.5"):
        mixture(prepared, other, weights=(1.0, 1.0)).load_state_dict(state)
    single = BatchLoader(TokenData(prepared).splits["train"], seq_len=16, global_batch=8, seed=3)
    with pytest.raises(ValueError, match=r"this run has unset \(data.source\)"):
        single.load_state_dict(state)
    with pytest.raises(ValueError, match=r"trained with data.mixture=unset \(data.source\), this run has \[small"):
        mixture(prepared, other).load_state_dict(single.state_dict())


def test_a_source_with_another_tokenizer_is_named(small_cfg, prepared, other):
    alien = prepare(replace(small_cfg, name="alien", vocab_size=300))
    sources = {"small": TokenData(prepared), "other": TokenData(other), "alien": TokenData(alien)}
    check_same_tokenizer({k: sources[k] for k in ("small", "other")})
    with pytest.raises(ValueError, match=f"source alien \\({alien}\\) has another tokenizer than small"):
        check_same_tokenizer(sources)


def test_a_source_shorter_than_a_window_is_named(prepared, other):
    with pytest.raises(ValueError, match="longer than the training split of data.mixture source other"):
        mixture(prepared, other, seq_len=TokenData(other).splits["train"].num_tokens)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[]", "data.mixture is empty"),
        ("[{path:/a,weight:0}]", r"data.mixture\[0\].weight=0.0 must be > 0"),
        ("[{path:/a},{source:b,weight:-1}]", r"data.mixture\[1\].weight=-1.0 must be > 0"),
        ("[{paht:/a}]", r"unknown config key 'data.mixture\[0\].paht'"),
        ("[{path:/a},{source:b,wieght:2}]", r"unknown config key 'data.mixture\[1\].wieght'"),
        ("[{path:/a,source:b}]", r"data.mixture\[0\] needs exactly one of path .* or source"),
        ("[{weight:2}]", r"data.mixture\[0\] needs exactly one of path .* or source"),
        ("[{path:/x/web},{source:/y/web}]", "two sources are named 'web'"),
        ("[{path:/x,name:'a b'}]", r"data.mixture\[0\].name='a b': use letters"),
    ],
)
def test_a_bad_mixture_fails_at_compose_time_in_one_line(value, message):
    with pytest.raises(ValueError, match=message) as error:
        compose([f"data.mixture={value}"])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("compose_data", [lambda o: compose(o).data, prepare_compose])
@pytest.mark.parametrize("override", ["data.mixture", "+data.mixture"])
def test_a_mistyped_key_in_an_entry_is_named_with_its_place(compose_data, override):
    with pytest.raises(ValueError, match=r"^unknown config key 'data.mixture\[1\].wieght' \(check the spelling"):
        compose_data([f"{override}=[{{path:/a}},{{source:b,wieght:2}}]"])


def test_a_mistyped_key_in_a_saved_entry_is_named_with_its_place(tmp_path):
    saved = tmp_path / "config.yaml"
    saved.write_text("data:\n  mixture:\n  - path: /a\n  - source: b\n    wieght: 2\n")
    with pytest.raises(ValueError, match=r"config.yaml: unknown config key 'data.mixture\[1\].wieght'"):
        compose_saved(saved, RunConfig)


def test_names_default_to_the_folder_or_source():
    cfg = compose(
        ["data.mixture=[{path:/data/web-0123456789abcdef,weight:3},{source:hf:org/books},{source:shakespeare}]"]
    )
    assert [(e.name, e.weight) for e in cfg.data.mixture] == [("web", 3.0), ("books", 1.0), ("shakespeare", 1.0)]
