"""Faults the reliability cases put into a copy of the reference run (see conftest.py), shared by the test files."""

import json

import torch
from safetensors.torch import load_file, save_file

from lrm_train.data.tokenizer import train_bpe
from lrm_train.utils import sha256_file

STEP_2, STEP_4 = "checkpoints/step_00000002", "checkpoints/step_00000004"


def nothing(run):
    pass


def flip_bytes(path, offset=5000, count=4):
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def rehash(checkpoint):
    """Make a tampered checkpoint's manifest agree with its files again (so the content itself is tested)."""
    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    files = [name for name in manifest["files"] if (checkpoint / name).exists()]
    manifest["files"] = {name: sha256_file(checkpoint / name) for name in files}
    (checkpoint / "checkpoint.json").write_text(json.dumps(manifest))


def every_checkpoint_corrupt(run):
    for step in (STEP_2, STEP_4):
        flip_bytes(run / step / "model.safetensors")


def weights_of_a_smaller_model(run):
    path = run / STEP_4 / "model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("layers.1.")}, path)
    rehash(run / STEP_4)


def written_before_checkpoints_carried_their_tokenizer(run):
    """step_4 as an lrm_train of before this change wrote it: no tokenizer.json, no ``run["data"]``."""
    checkpoint = run / STEP_4
    plain = torch.load(checkpoint / "state.pt", weights_only=True)
    del plain["run"]["data"]
    torch.save(plain, checkpoint / "state.pt")
    (checkpoint / "tokenizer.json").unlink()
    rehash(checkpoint)


def write_foreign_tokenizer(path):
    """A valid tokenizer.json of the same size that is not the run's."""
    train_bpe(["an entirely different corpus, with other merges"] * 50, 512).save(str(path))
    return path
