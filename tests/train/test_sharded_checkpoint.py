"""The sharded checkpoint format (lrm_train.checkpoint/3): pieces of several ranks put back together, refused when
they do not fit, consolidated into the full-state format, written in the background like in the foreground."""

import json

import pytest
import torch
from runs import losses, run_config
from safetensors import safe_open
from safetensors.torch import load_file

from lrm_train.distributed.engine import DistConfig, Engine, TensorPiece
from lrm_train.train import train
from lrm_train.train.checkpoint import (
    FULL_FORMAT,
    MANIFEST,
    RankSnapshot,
    ShardedSave,
    load_checkpoint,
    load_resumable,
    snapshot,
    write_rank_files,
)
from lrm_train.train.consolidate import main as consolidate_main

WEIGHT = torch.arange(12.0).reshape(3, 4)
MOMENT = torch.arange(12.0).reshape(3, 4) / 10


def _write_two_ranks(folder, cut: int, second_offset: int | None = None, weights_only: bool = False):
    """What two ZeRO-3 ranks write: each a flat slice of the weight and of its moment (none for a weights-only
    checkpoint); rank 0 also the state."""
    second_offset = cut if second_offset is None else second_offset
    flat, moment = WEIGHT.reshape(-1), MOMENT.reshape(-1)
    tokenizer = folder.parent / "tokenizer.json"
    tokenizer.write_text("{}")
    state = {
        "format": "lrm_train.checkpoint/3",
        "rng": [torch.ones(2)],
        **({"optimizer": None} if weights_only else {}),
    }
    ranks = [
        snapshot(
            0,
            [TensorPiece("w", (3, 4), 0, flat[:cut]), TensorPiece("b", (2,), 0, torch.ones(2))],
            None
            if weights_only
            else [TensorPiece("w/exp_avg", (3, 4), 0, moment[:cut]), TensorPiece("w/step", (), 0, torch.tensor(3.0))],
            state,
            tokenizer,
        ),
        snapshot(
            1,
            [TensorPiece("w", (3, 4), second_offset, flat[second_offset:])],
            None if weights_only else [TensorPiece("w/exp_avg", (3, 4), second_offset, moment[second_offset:])],
            None,
            None,
        ),
    ]
    folder.mkdir()
    files = {}
    for rank in ranks:
        files.update(write_rank_files(folder, rank))
    (folder / MANIFEST).write_text(json.dumps({"format": "lrm_train.checkpoint/3", "step": 3, "files": files}))
    return files


def test_the_pieces_of_two_ranks_load_as_the_full_tensors(tmp_path):
    files = _write_two_ranks(tmp_path / "c", cut=5)
    assert sorted(files) == [
        "model.rank00001.safetensors",
        "model.safetensors",
        "optimizer.rank00001.safetensors",
        "optimizer.safetensors",
        "state.pt",
        "tensors.safetensors",
        "tokenizer.json",
    ]
    # A whole tensor is stored as itself (a one-rank model file is a plain state dict); a slice flat, by offset.
    assert sorted(load_file(tmp_path / "c" / "model.safetensors")) == ["b", "w@0"]
    model, state = load_checkpoint(tmp_path / "c")
    assert torch.equal(model["w"], WEIGHT) and torch.equal(model["b"], torch.ones(2))
    assert torch.equal(state["optimizer"]["w"]["exp_avg"], MOMENT) and state["optimizer"]["w"]["step"] == 3


def test_a_weights_only_checkpoint_of_two_ranks_has_no_optimizer_files_and_says_so(tmp_path):
    files = _write_two_ranks(tmp_path / "c", cut=5, weights_only=True)
    assert sorted(files) == [
        "model.rank00001.safetensors",
        "model.safetensors",
        "state.pt",
        "tensors.safetensors",
        "tokenizer.json",
    ]
    model, state = load_checkpoint(tmp_path / "c")
    assert torch.equal(model["w"], WEIGHT) and state["optimizer"] is None


@pytest.mark.parametrize("second_offset", [6, 4], ids=["gap", "overlap"])
def test_pieces_that_do_not_cover_a_tensor_exactly_are_one_line(tmp_path, second_offset):
    _write_two_ranks(tmp_path / "c", 5, second_offset)
    message = "the pieces of w overlap or leave a gap at element 5"
    with pytest.raises(ValueError, match=f"checkpoint {tmp_path / 'c'}: {message}"):
        load_checkpoint(tmp_path / "c")


def test_a_save_that_failed_on_a_rank_leaves_no_checkpoint(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    snap = RankSnapshot(0, [TensorPiece("w", (2,), 0, torch.ones(2))], [], {"format": "x"}, {}, tmp_path / "missing")
    save = ShardedSave(Engine(DistConfig(device="cpu")), tmp_path / "step_00000001", snap, 1, background=True)
    with pytest.raises(OSError, match="missing"):
        save.finish()
    assert list(tmp_path.iterdir()) == [tmp_path / "tokenizer.json"]  # no folder, no temporary


@pytest.fixture
def run(data_root, tmp_path):
    return train(run_config(data_root, tmp_path / "run", **{"train.max_steps": 4, "train.ckpt_every": 2}))


def test_consolidate_writes_the_full_format_which_resumes_bit_exactly(data_root, tmp_path, run):
    sharded = run.last_checkpoint
    out = tmp_path / "full"
    assert consolidate_main([str(sharded), str(out)]) == 0
    model, state = load_resumable(out)
    assert state["format"] == FULL_FORMAT and set(load_file(out / "model.safetensors")) == set(model)
    assert not (out / "optimizer.safetensors").exists()
    expected_model, expected = load_resumable(sharded)
    assert all(torch.equal(model[k], v) for k, v in expected_model.items())
    for name, entry in expected["optimizer"].items():
        assert all(torch.equal(state["optimizer"][name][k], v) for k, v in entry.items())
    # Both forms resume to the same run.
    longer = {"train.max_steps": 6, "train.ckpt_every": 2}
    from_full = train(run_config(data_root, tmp_path / "a", **longer, **{"train.resume": str(out)}))
    from_sharded = train(run_config(data_root, tmp_path / "b", **longer, **{"train.resume": str(sharded)}))
    assert losses(from_full.run_dir) == losses(from_sharded.run_dir)


def test_consolidate_refuses_to_replace_a_folder_it_did_not_write(tmp_path, run, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert consolidate_main([str(run.last_checkpoint), str(tmp_path / "mine"), "overwrite=true"]) == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: refusing to replace {tmp_path / 'mine'}")
    )
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_background_saves_write_the_same_checkpoints(data_root, tmp_path, run):
    background = train(
        run_config(
            data_root,
            tmp_path / "async",
            **{"train.max_steps": 4, "train.ckpt_every": 2, "train.async_checkpoint": True},
        )
    )
    assert background.last_checkpoint.name == run.last_checkpoint.name == "step_00000004"
    assert losses(background.run_dir) == losses(run.run_dir)
    # The same tensors, bit for bit, and the same metadata (not the same bytes: safetensors writes the metadata's keys
    # in a hash map's order, which changes from one write to the next).
    for name in ("model.safetensors", "optimizer.safetensors", "tensors.safetensors"):
        with (
            safe_open(background.last_checkpoint / name, "pt") as got,
            safe_open(run.last_checkpoint / name, "pt") as ref,
        ):
            assert got.metadata() == ref.metadata(), name
            assert list(got.keys()) == list(ref.keys()), name
            for key in ref.keys():  # noqa: SIM118
                a, b = got.get_tensor(key), ref.get_tensor(key)
                assert a.dtype == b.dtype and torch.equal(a, b), (name, key)
