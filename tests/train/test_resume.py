"""Exact resume: 2N steps in one run equal N steps, a stop, and N resumed steps, bit for bit (CPU, float32)."""

import json

import pytest
from runs import as_args, cli, launch, losses, mixture, overrides, records, run_config

from lrm_train.train import train
from lrm_train.train.checkpoint import complete_checkpoints


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_single_process_resume_is_bitwise_exact(data_root, tmp_path, optim):
    whole = train(run_config(data_root, tmp_path / "whole", **{"optim.name": optim}))
    assert whole.step == 8
    first = train(run_config(data_root, tmp_path / "split", **{"optim.name": optim, "train.stop_at_step": 4}))
    assert first.step == 4
    resumed = train(run_config(data_root, tmp_path / "split", **{"optim.name": optim}))
    assert resumed.step == 8
    expected, got = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert sorted(got) == list(range(1, 9))
    assert got == expected  # every step, bit for bit
    assert resumed.final_val_loss == whole.final_val_loss


@pytest.mark.multiprocess
def test_ddp_two_ranks_resume_is_bitwise_exact(data_root, tmp_path):
    base = overrides(
        data_root,
        tmp_path / "whole",
        **{
            "dist.name": "ddp",
            "optim.name": "muon",
            "train.max_steps": 6,
            "train.ckpt_every": 3,
            "train.micro_batch_size": 2,
        },
    )
    whole = launch("torchrun_single_node.sh", as_args(base), nproc=2)  # the launcher users run
    assert whole.returncode == 0, whole.stderr[-2000:]
    for extra in ({"train.stop_at_step": 3}, {}):
        done = cli(as_args({**base, "train.run_dir": tmp_path / "split", **extra}), nproc=2)
        assert done.returncode == 0, done.stderr[-2000:]
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert sorted(losses(tmp_path / "whole")) == list(range(1, 7))
    assert (tmp_path / "whole" / "train_rank1.log").exists()


def test_resume_auto_ignores_partial_checkpoints(data_root, tmp_path):
    train(run_config(data_root, tmp_path, **{"train.stop_at_step": 4}))
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step_00000006").mkdir()  # no checkpoint.json: an interrupted write
    (checkpoints / "step_00000006" / "model.safetensors").write_bytes(b"partial")
    (checkpoints / ".tmp-step_00000007-abcd1234").mkdir()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000004"]
    resumed = train(run_config(data_root, tmp_path))
    assert resumed.step == 8 and sorted(losses(tmp_path)) == list(range(1, 9))
    assert "resumed from" in (tmp_path / "train_rank0.log").read_text()


def test_keep_last_prunes_old_checkpoints(data_root, tmp_path):
    train(run_config(data_root, tmp_path, **{"train.ckpt_every": 2, "train.keep_last": 2}))
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000006", "step_00000008"]


@pytest.mark.multiprocess
def test_resume_on_another_world_size(data_root, tmp_path):
    """Same global batch (micro 4 x accum 2 x 1 rank = micro 4 x accum 1 x 2 ranks): 1 -> 2 and 2 -> 1 ranks."""
    one_rank = {"train.micro_batch_size": 4, "train.grad_accum": 2, "optim.name": "muon"}
    two_ranks = {"train.micro_batch_size": 4, "train.grad_accum": 1, "optim.name": "muon", "dist.name": "ddp"}
    reference = losses(train(run_config(data_root, tmp_path / "ref", **one_rank)).run_dir)

    train(run_config(data_root, tmp_path / "grow", **one_rank, **{"train.stop_at_step": 4}))
    grown = cli(as_args(overrides(data_root, tmp_path / "grow", **two_ranks)), nproc=2)
    assert grown.returncode == 0, grown.stderr[-2000:]

    shrink = overrides(data_root, tmp_path / "shrink", **two_ranks, **{"train.stop_at_step": 4})
    assert cli(as_args(shrink), nproc=2).returncode == 0
    manifest = tmp_path / "shrink" / "checkpoints" / "step_00000004" / "checkpoint.json"
    assert not [f for f in json.loads(manifest.read_text())["files"] if ".rank" in f]  # DDP: written once, by rank 0
    train(run_config(data_root, tmp_path / "shrink", **one_rank))

    for run in ("grow", "shrink"):
        got = losses(tmp_path / run)
        assert sorted(got) == list(range(1, 9))
        for step in range(1, 9):  # summation order differs across world sizes: equal up to rounding
            assert got[step] == pytest.approx(reference[step], rel=1e-5), (run, step)


def _steps(run_dir) -> list[int]:
    with open(f"{run_dir}/metrics.jsonl") as f:
        return [json.loads(line)["step"] for line in f]


def test_a_resumed_run_writes_each_step_once(data_root, tmp_path):
    # Steps 5 and 6 are logged but never checkpointed (ckpt_every=4): the resumed run redoes them.
    train(run_config(data_root, tmp_path, **{"train.stop_at_step": 6}))
    assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    train(run_config(data_root, tmp_path))
    assert _steps(tmp_path) == list(range(1, 9))


def test_resume_auto_skips_a_newest_checkpoint_that_fails_verification(data_root, tmp_path):
    reference = losses(train(run_config(data_root, tmp_path / "ref")).run_dir)
    train(run_config(data_root, tmp_path / "run", **{"train.stop_at_step": 6, "train.ckpt_every": 2}))
    newest = complete_checkpoints(tmp_path / "run")[-1]
    assert newest.name == "step_00000006"
    (newest / "tensors.safetensors").write_bytes(b"torn")
    train(run_config(data_root, tmp_path / "run"))
    log = (tmp_path / "run" / "train_rank0.log").read_text()
    assert f"skipping checkpoint {newest}: tensors.safetensors does not match its checksum" in log
    assert f"resumed from {newest.parent / 'step_00000004'} at step 4" in log
    assert losses(tmp_path / "run") == reference


def test_a_refused_resume_leaves_the_run_config_alone(data_root, tmp_path):
    train(run_config(data_root, tmp_path, **{"train.max_steps": 4}))
    saved = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ValueError, match="trained with optim=adamw, this run has optim=muon"):
        train(run_config(data_root, tmp_path, **{"train.max_steps": 6, "optim.name": "muon"}))
    assert (tmp_path / "config.yaml").read_text() == saved


def test_mixture_resume_is_bitwise_exact(data_root, tmp_path):
    """A 2-source mixture: losses, per-source validation losses and token shares, bit for bit."""
    whole = train(run_config(data_root, tmp_path / "whole", **mixture(data_root)))
    train(run_config(data_root, tmp_path / "split", **mixture(data_root), **{"train.stop_at_step": 4}))
    resumed = train(run_config(data_root, tmp_path / "split", **mixture(data_root)))
    assert sorted(records(tmp_path / "split")) == list(range(1, 9))
    assert records(tmp_path / "split") == records(tmp_path / "whole")
    assert resumed.final_val_loss == whole.final_val_loss


@pytest.mark.multiprocess
def test_mixture_on_two_ranks_reads_what_one_rank_reads_and_resumes_bitwise(data_root, tmp_path):
    """The global batches do not depend on the world size (1 rank x accum 2 = 2 ranks x accum 1), and 2 ranks resume
    bit for bit."""
    one_rank = {**mixture(data_root), "train.micro_batch_size": 4, "train.grad_accum": 2}
    two_ranks = {**mixture(data_root), "train.micro_batch_size": 4, "dist.name": "ddp"}
    reference = records(train(run_config(data_root, tmp_path / "ref", **one_rank)).run_dir)
    for run, extra in (("whole", {}), ("split", {"train.stop_at_step": 4}), ("split", {})):
        done = cli(as_args(overrides(data_root, tmp_path / run, **two_ranks, **extra)), nproc=2)
        assert done.returncode == 0, done.stderr[-2000:]
    assert records(tmp_path / "split") == records(tmp_path / "whole")
    got = records(tmp_path / "whole")
    assert sorted(got) == sorted(reference) == list(range(1, 9))
    for step, record in got.items():
        assert record.keys() == reference[step].keys()
        for key, value in record.items():  # shares exactly; losses up to the summation order across ranks
            assert value == (
                reference[step][key] if key.startswith("data/") else pytest.approx(reference[step][key], rel=1e-5)
            )
