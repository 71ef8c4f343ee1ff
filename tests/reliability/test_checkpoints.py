"""Fault cases of resuming: every checkpoint unreadable, or not this run's. Each is refused with one line naming the
checkpoint and the cause, and the run directory is left byte for byte as it was (the log aside)."""

import os
import random

import pytest
import torch
from faults import STEP_2, STEP_4, every_checkpoint_corrupt, nothing, rehash, weights_of_a_smaller_model
from harness import assert_refused, assert_untouched, run_main, snapshot
from runs import as_args, overrides

from lrm_train.train.__main__ import main as train_main


def only_checkpoint_without_manifest(run):
    for name in os.listdir(run / STEP_2):
        os.remove(run / STEP_2 / name)
    os.rmdir(run / STEP_2)
    os.remove(run / STEP_4 / "checkpoint.json")


def state_pt_random_bytes(seed):
    """Bytes that are no pickle; torch's unpickler fails on them with UnpicklingError, IndexError, KeyError or
    UnicodeDecodeError depending on the bytes (seeds 0, 2, 20, 195)."""

    def fault(run):
        (run / STEP_4 / "state.pt").write_bytes(random.Random(seed).randbytes(4096))
        rehash(run / STEP_4)

    return fault


def state_pt_that_runs_code(run):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {run}/PWNED",))

    torch.save({"format": Payload()}, run / STEP_4 / "state.pt")
    rehash(run / STEP_4)


def manifest_not_json(run):
    (run / STEP_4 / "checkpoint.json").write_text("{not json")


CASES = {
    # name: (fault, overrides, the line)
    "N20 every checkpoint corrupt": (
        every_checkpoint_corrupt,
        {},
        (
            r"train.resume=auto: no checkpoint of \S+/checkpoints loads \(step_00000004: model.safetensors does not "
            r"match its checksum .*; step_00000002: model.safetensors does not match .*\); nothing was changed. "
            r"To start over: train.resume=none"
        ),
    ),
    "N19 the only checkpoint lacks its manifest": (
        only_checkpoint_without_manifest,
        {},
        r"no checkpoint of \S+ loads \(step_00000004: no checkpoint.json, so it is not a complete checkpoint\)",
    ),
    "K12 another seq_len": (
        nothing,
        {"data.seq_len": 16},
        r"step_00000004: trained with data.seq_len=32, this run has 16",
    ),
    "K05 another depth": (
        nothing,
        {"model.num_hidden_layers": 3},
        r"step_00000004: trained with model.num_hidden_layers=2, this run has 3",
    ),
    "K07 another optimizer": (
        nothing,
        {"optim": "muon"},
        (
            r"step_00000004: trained with optim=adamw, this run has optim=muon .*; to train this config give it its "
            r"own run \(experiment.name=NAME or train.run_dir=PATH\), or start this one over with train.resume=none"
        ),
    ),
    "K11 another global batch": (
        nothing,
        {"train.micro_batch_size": 2},
        r"step_00000004: global batch 4, this run has 2 .*adjust train.grad_accum",
    ),
    "K13 weights of another model": (
        weights_of_a_smaller_model,
        {"train.resume": STEP_4},
        (
            r"step_00000004: its weights were made for another model than the config it records \(\d+ tensors "
            r"missing, e.g. layers.1.\S+\)$"
        ),
    ),
    **{
        f"K04b state.pt of random bytes ({seed})": (
            state_pt_random_bytes(seed),
            {"train.resume": STEP_4},
            r"step_00000004: state.pt is not plain data \(.+\); it is refused on purpose",
        )
        for seed in (0, 2, 20, 195)
    },
    "K09 state.pt that would run code": (
        state_pt_that_runs_code,
        {"train.resume": STEP_4},
        r"step_00000004: state.pt is not plain data \(.*unsupported GLOBAL.*\); it is refused on purpose",
    ),
    "K10 manifest not JSON": (manifest_not_json, {"train.resume": STEP_4}, r"checkpoint.json is unreadable"),
    "K08 no such folder": (nothing, {"train.resume": "/nonexistent"}, r"train.resume=/nonexistent: no such checkpoint"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_checkpoint_that_cannot_be_resumed_is_refused_and_nothing_is_touched(case, copy_of, data_root):
    fault, extra, line = CASES[case]
    run = copy_of()
    fault(run)
    if str(extra.get("train.resume", "")).startswith("checkpoints/"):
        extra = {**extra, "train.resume": run / extra["train.resume"]}
    before = snapshot(run)
    argv = as_args(overrides(data_root, run, **{"train.max_steps": 6, "train.ckpt_every": 2, **extra}))
    refusal = assert_refused(run_main(train_main, argv), line)
    assert "weights_only" not in refusal  # we refuse on purpose; torch's advice to load unsafely is not ours
    assert_untouched(before, ignore=("train_rank0.log",))
    assert not (run / "PWNED").exists()
