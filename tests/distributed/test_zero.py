"""DeepSpeed ZeRO 1/2/3 on 2 gloo ranks against the single-process trainer, resume, export, no JIT builds."""

import json
import math
import types

import pytest
import torch
from runs import as_args, assert_same_trajectory, cli, launch, losses, overrides, run_config

from lrm_train.distributed.engine import DistConfig
from lrm_train.distributed.zero import ZeroEngine, deepspeed_config
from lrm_train.models import FalconH1LM, preset
from lrm_train.nn import LRMConfig
from lrm_train.optim import OptimConfig, build_optimizer, classify_parameters
from lrm_train.train import open_trainer, train

# Clipping is active (gradient norms are 2-4x the threshold) and the learning rate is high enough to move the loss.
SETTINGS = {
    "optim.lr": 0.02,
    "train.grad_clip": 0.02,
    "train.max_steps": 10,
    "train.micro_batch_size": 2,
    "train.ckpt_every": 5,
    "dist.zero3_persistence_threshold": 0,
}
ONE_PROCESS = {**SETTINGS, "train.grad_accum": 2}  # the same global batch of 4 sequences
TWO_RANKS = {**SETTINGS, "train.grad_accum": 1}


@pytest.fixture(scope="module")
def jit_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("torch_extensions")


def zero(data_root, run_dir, jit_dir, nproc=2, **extra):
    values = overrides(data_root, run_dir, **{**(TWO_RANKS if nproc == 2 else ONE_PROCESS), **extra})
    done = cli(as_args(values), nproc=nproc, env={"TORCH_EXTENSIONS_DIR": str(jit_dir)})
    assert done.returncode == 0, done.stderr[-3000:]
    return losses(run_dir)


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    dirs = {
        name: train(run_config(data_root, root / name, **ONE_PROCESS, **{"optim.name": name})).run_dir
        for name in ("adamw", "muon")
    }
    return {"dir": dirs, **{name: losses(run_dir) for name, run_dir in dirs.items()}}


@pytest.mark.multiprocess
@pytest.mark.parametrize("optim", ["adamw", "muon"])
@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_zero_matches_the_single_process_trainer(data_root, tmp_path, jit_dir, reference, stage, optim):
    got = zero(data_root, tmp_path, jit_dir, **{"dist.name": stage, "optim.name": optim})
    assert_same_trajectory(got, reference[optim])
    table = (tmp_path / "train_rank0.log").read_text()
    rows = {
        line.split()[0]: line.split()
        for line in table.splitlines()
        if line.split() and line.split()[0] in ("matrix", "multiplier", "embedding", "norm")
    }
    assert rows["matrix"][3] == ("muon" if optim == "muon" else "adamw")
    assert rows["multiplier"][3] == "adamw" and rows["multiplier"][5] == "0.002"
    assert rows["norm"][5] == "0"
    # The trajectories are taken from whole parameters (ZeRO-3 gathers them first).
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    expected = json.loads((reference["dir"][optim] / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("norm/layers.0.self_attn.q_proj", "lrm/layers.1.mamba.out_proj.lrm_row/max", "abm/matrix@hidden/32x32"):
        assert last[key] == pytest.approx(expected[key], rel=1e-5), key


# LRs and WDs != 1 per class and per role (matrices and multipliers), Muon on two matrix groups.
PER_GROUP = {
    "optim.name": "muon",
    "optim.embedding.lr_mult": 2.0,
    "optim.norm.lr_mult": 0.5,
    "optim.roles": "[{pattern:'attn.*',lr_mult:0.5},{pattern:ssm.dt,multipliers:true,lr_mult:3.0,wd_mult:2.0}]",
}


@pytest.mark.multiprocess
def test_zero3_keeps_per_class_and_per_role_learning_rates(data_root, tmp_path, jit_dir, reference):
    expected = losses(train(run_config(data_root, tmp_path / "one", **ONE_PROCESS, **PER_GROUP)).run_dir)
    assert expected[10] != reference["muon"][10]  # the groups change the run, so the comparison means something
    assert_same_trajectory(
        zero(data_root, tmp_path / "zero3", jit_dir, **PER_GROUP, **{"dist.name": "zero3"}), expected
    )
    table = (tmp_path / "zero3" / "train_rank0.log").read_text()
    assert any(line.split()[:4] == ["matrix/attn.*@hidden", "8", "6,144", "muon"] for line in table.splitlines()), table


@pytest.mark.multiprocess
def test_zero2_with_gradient_accumulation_matches_the_single_process_trainer(data_root, tmp_path, jit_dir, reference):
    # 2 ranks x 2 micro-batches of 1 sequence: the global batch of 4 again, accumulated inside DeepSpeed's engine.
    got = zero(
        data_root, tmp_path, jit_dir, **{"dist.name": "zero2", "train.micro_batch_size": 1, "train.grad_accum": 2}
    )
    assert_same_trajectory(got, reference["adamw"])


@pytest.mark.multiprocess
def test_zero_resume_is_exact_and_crosses_world_sizes(data_root, tmp_path, jit_dir, reference):
    # Same world size: 5 steps (started with the deepspeed launcher script), a stop, 5 resumed steps.
    first = overrides(data_root, tmp_path / "same", **{**TWO_RANKS, "optim.name": "muon", "train.stop_at_step": 5})
    started = launch(
        "deepspeed.sh", ["dist=zero2", *as_args(first)], nproc=2, env={"TORCH_EXTENSIONS_DIR": str(jit_dir)}
    )
    assert started.returncode == 0, started.stderr[-3000:]
    assert (
        "untested optimizer" not in started.stderr and "is deprecated" not in started.stderr
    )  # warnings no one can act on
    assert_same_trajectory(
        zero(data_root, tmp_path / "same", jit_dir, **{"dist.name": "zero2", "optim.name": "muon"}), reference["muon"]
    )
    # 2 ranks -> 1 and 1 -> 2 (the global batch stays 4 through train.grad_accum).
    zero(
        data_root, tmp_path / "shrink", jit_dir, **{"dist.name": "zero3", "optim.name": "muon", "train.stop_at_step": 5}
    )
    shrunk = zero(data_root, tmp_path / "shrink", jit_dir, nproc=1, **{"dist.name": "zero3", "optim.name": "muon"})
    assert_same_trajectory(shrunk, reference["muon"])
    zero(
        data_root,
        tmp_path / "grow",
        jit_dir,
        nproc=1,
        **{"dist.name": "zero1", "optim.name": "adamw", "train.stop_at_step": 5},
    )
    grown = zero(data_root, tmp_path / "grow", jit_dir, **{"dist.name": "zero1", "optim.name": "adamw"})
    assert_same_trajectory(grown, reference["adamw"])


@pytest.mark.multiprocess
def test_a_zero3_checkpoint_exports_to_transformers_and_resumes_in_one_process(data_root, tmp_path, jit_dir, reference):
    from transformers import FalconH1ForCausalLM

    from lrm_train.hf.__main__ import main as hf_cli
    from lrm_train.train.checkpoint import model_from_checkpoint

    zero(data_root, tmp_path / "run", jit_dir, **{"dist.name": "zero3", "train.stop_at_step": 5})
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000005"
    ours = model_from_checkpoint(checkpoint)
    assert any(p.abs().sum() > 0 for n, p in ours.named_parameters() if "lrm_" in n)
    assert hf_cli(["export", str(checkpoint), str(tmp_path / "hf")]) == 0
    theirs = FalconH1ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        expected = ours(ids)
        assert ((theirs(ids).logits - expected).norm() / expected.norm()).item() < 1e-4
    # The checkpoint is the trainer's own: the single-process engine picks the run up where ZeRO-3 left it.
    resumed = train(run_config(data_root, tmp_path / "run", **ONE_PROCESS, **{"optim.name": "adamw"}))
    assert_same_trajectory(losses(resumed.run_dir), reference["adamw"])


@pytest.mark.multiprocess
def test_a_zero3_checkpoint_is_split_by_rank_and_resumes_under_ddp(data_root, tmp_path, jit_dir, reference):
    from safetensors import safe_open

    from lrm_train.train.checkpoint import load_checkpoint

    extra = {"dist.name": "zero3", "train.stop_at_step": 5, "train.async_checkpoint": "true"}
    zero(data_root, tmp_path, jit_dir, **extra)
    checkpoint = tmp_path / "checkpoints" / "step_00000005"
    files = json.loads((checkpoint / "checkpoint.json").read_text())["files"]
    assert {"model.rank00001.safetensors", "optimizer.rank00001.safetensors"} <= set(files)
    held = {}
    for name in ("optimizer.safetensors", "optimizer.rank00001.safetensors"):
        with safe_open(checkpoint / name, "pt") as f:
            shapes = [f.get_slice(key).get_shape() for key in f.keys()]  # noqa: SIM118
            held[name] = sum(math.prod(shape) for shape in shapes if shape)  # the step counts (0-d) left out
    full = load_checkpoint(checkpoint)[1]["optimizer"]
    moments = sum(t.numel() for entry in full.values() for t in entry.values() if t.ndim > 0)
    assert sum(held.values()) == moments  # every element once, split by rank: no file holds the full state
    assert all(0 < count < moments for count in held.values()), held
    resumed = zero(data_root, tmp_path, jit_dir, **{"dist.name": "ddp", "optim.name": "adamw"})
    assert_same_trajectory(resumed, reference["adamw"])


def test_the_engine_refuses_groups_deepspeed_would_have_merged():
    model = FalconH1LM(preset("tiny"), LRMConfig("full"))
    classes = classify_parameters(model)
    optimizer = build_optimizer(model, classes, OptimConfig(name="muon"))
    engine = object.__new__(ZeroEngine)
    engine.cfg, engine.stage = DistConfig(name="zero2"), 2
    engine.names = {id(p): n for n, p in model.named_parameters()}
    engine.client = types.SimpleNamespace(param_groups=optimizer.param_groups)
    merged = [list(g["params"]) for g in optimizer.param_groups]
    merged[0] = merged[0] + merged[1]  # as if two classes had been merged into one group
    engine.ds_optimizer = types.SimpleNamespace(round_robin_bit16_groups=merged)
    with pytest.raises(ValueError, match="DeepSpeed regrouped the parameters"):
        engine._verify_and_map([g["name"] for g in optimizer.param_groups])


@pytest.mark.multiprocess
def test_bf16_parameters_follow_the_autocast_run(data_root, tmp_path, jit_dir, reference):
    # The same run in one process under bf16 autocast (float32 weights), and on 2 ranks with bf16 parameters and
    # float32 master weights: bf16 rounding apart, the same losses.
    autocast = train(run_config(data_root, tmp_path / "autocast", **ONE_PROCESS, **{"train.precision": "bf16"}))
    expected = losses(autocast.run_dir)
    got = zero(data_root, tmp_path / "bf16", jit_dir, **{"dist.name": "zero2", "dist.bf16_params": True})
    assert sorted(got) == sorted(expected) == list(range(1, 11))
    for step, loss in expected.items():
        assert abs(got[step] - loss) / loss < 1e-2, (step, got[step], loss)
    assert got[10] < got[1] - 0.1  # it trains
    assert max(abs(got[s] - reference["adamw"][s]) / reference["adamw"][s] for s in got) > 1e-4  # not a float32 run
    # The checkpoint holds the float32 master weights, which the single-process engine resumes from.
    from safetensors.torch import load_file

    state = load_file(tmp_path / "bf16" / "checkpoints" / "step_00000010" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert any((v.bfloat16().float() != v).any() for v in state.values())  # not bf16 values stored as float32


def test_zero_computes_in_bf16_under_bf16_precision_as_it_would_on_a_gpu(
    data_root, tmp_path, one_rank_launch, monkeypatch
):
    # DeepSpeed's forward switches off an autocast it finds enabled unless its config has a `torch_autocast` section;
    # it asks torch.is_autocast_enabled() with no device, which reports CUDA's autocast. On an H200 ZeRO thus trained
    # in float32 under train.precision=bf16 (its gradient norm 0.2% off the single process's from the first step).
    # Made to report the CPU's autocast here, DeepSpeed acts as it does on a GPU. (One ZeRO engine per process:
    # DeepSpeed keeps its process groups after ours are gone.)
    reads = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *device: reads(*device) if device else reads("cpu"))
    cfg = run_config(data_root, tmp_path, **{"dist.name": "zero1", "train.precision": "bf16", "train.max_steps": 1})
    with open_trainer(cfg) as trainer:
        seen = []
        down = trainer.components.model.layers[0].feed_forward.down_proj
        down.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        trainer.train_step()
    assert seen and set(seen) == {torch.bfloat16}


def test_deepspeed_is_asked_for_the_trainers_autocast_and_nothing_else():
    for stage in (1, 2, 3):
        cfg = DistConfig(name=f"zero{stage}")
        assert "torch_autocast" not in deepspeed_config(stage, cfg, None)  # it would turn autocast on by itself
        assert deepspeed_config(stage, cfg, torch.bfloat16)["torch_autocast"] == {
            "enabled": True,
            "dtype": "torch.bfloat16",
            "lower_precision_safe_modules": [],  # else nn.Linear's gradients would be reduced in bf16
        }
