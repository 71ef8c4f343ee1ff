"""Helpers for the tests: the micro model (as a config, or a run in process or through the CLI)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from lrm_train.distributed import exit_without_shutdown
from lrm_train.models import FalconH1Config
from lrm_train.train import RunConfig, compose

# fmt: off
MICRO_MODEL = dict(
    vocab_size=512, hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, mamba_d_ssm=32, mamba_n_heads=2, mamba_d_head=16, mamba_d_state=8,
    mamba_chunk_size=16,
)
# The micro model as the model tests change it: every sharing the forward has (4 query heads on 2 KV heads, 4 SSM heads
# in 2 groups), chunks of 4 (shorter than the sequences those tests feed it) and a vocabulary of 64 (their token ids).
GROUPED_HEADS = dict(
    vocab_size=64, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=None, mamba_n_heads=4,
    mamba_d_head=8, mamba_n_groups=2, mamba_chunk_size=4,
)
# fmt: on

# compare_cpu's mup and lrm arms alone, at the muP-transferred values: the comparison's mechanics need no more.
COMPARE_TWO_ARMS = [
    "tuned_config=null",
    "untuned=[]",
    "pairs=[]",
    "~arms.lrm_untuned",
    "~arms.transplant",
    "~transplant.transplant",
]


def micro_config(**changes) -> FalconH1Config:
    """The micro model as a config, for tests that build it in process; ``changes`` (the sizes a test depends on, say)
    replace fields."""
    return FalconH1Config(**{**MICRO_MODEL, **changes})


def overrides(data_root, run_dir, **extra) -> dict:
    """The micro run every trainer test starts from, as dotted keys (for the CLI) ..."""
    values = {f"model.{k}": v for k, v in MICRO_MODEL.items()}
    # The micro model is its own base width: muP's width scaling is 1, so the trainer tests train at the LRs they set
    # (at the tiny preset's base width, 1024, the hidden AdamW LR would be 32x optim.lr: chaotic, and runs that should
    # match to 1e-5 drift apart). The scaling itself is tests/nn/test_parametrization.py's.
    values["model.base_width"] = MICRO_MODEL["hidden_size"]
    values.update(
        {
            "data.out_root": data_root,
            "data.vocab_size": 512,
            "data.seq_len": 32,
            "data.val_windows": 8,
            "train.run_dir": str(run_dir),
            "train.max_steps": 8,
            "train.micro_batch_size": 4,
            "train.log_every": 1,
            "train.eval_every": 4,
            "train.ckpt_every": 4,
            "schedule.warmup_steps": 2,
            "logging.progress": False,
            "logging.wandb.mode": "disabled",
        }
    )
    values.update(extra)
    return values


def run_config(data_root, run_dir, **extra) -> RunConfig:
    """... and as a RunConfig (for in-process runs), composed exactly as the CLI composes it."""
    return compose(as_args(overrides(data_root, run_dir, **extra)))


def cli(args: list[str], nproc: int = 0, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m lrm_train.train`` (under torchrun with ``nproc`` ranks when given, on a free port: tests that run
    at once, as the GPU suite's xdist workers do, must not share torchrun's default one)."""
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
    ]
    launcher = torchrun if nproc else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [*launcher, "-m", "lrm_train.train", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def launch(script: str, args: list[str], nproc: int, timeout: int = 300, env: dict | None = None):
    """Run one of launch/*.sh with this interpreter's torchrun and deepspeed launchers."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "NPROC": str(nproc),
        "NUM_GPUS": str(nproc),
        "TORCHRUN": f"{sys.executable} -m torch.distributed.run",
        "DEEPSPEED": f"{sys.executable} -m deepspeed.launcher.runner",
        **(env or {}),
    }
    return subprocess.run(["bash", f"launch/{script}", *args], capture_output=True, text=True, timeout=timeout, env=env)


def free_port() -> int:
    """A TCP port free now on this machine, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_saved_worker() -> None:
    """End a spawned rank whose results are saved (see ``exit_without_shutdown``)."""
    exit_without_shutdown(0)


def as_args(values: dict) -> list[str]:
    return [f"{k}={v}" for k, v in values.items()]


def losses(run_dir) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a resumed run appends; later lines win)."""
    out = {}
    with open(f"{run_dir}/metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            out[record["step"]] = record["loss"]
    return out


def mixture(data_root) -> dict:
    """``data.mixture`` for trainer tests: the default corpus (weight 1) and a second small corpus, ``plays`` (weight 3),
    prepared by the run itself with the first one's tokenizer. The corpus is written once, beside ``data_root`` (its
    files' times are part of its prepared folder's key)."""
    corpus = Path(f"{data_root}-plays")
    if not corpus.exists():
        corpus.mkdir()
        for i in range(20):
            text = f"Scene {i}.\n" + "Now is the winter of our discontent made glorious summer. " * (5 + i % 4)
            (corpus / f"scene{i:02d}.txt").write_text(text)
    return {"data.mixture": f"[{{source:shakespeare,weight:1}},{{source:'{corpus}',name:plays,weight:3}}]"}


def records(run_dir) -> dict[int, dict]:
    """step -> metrics record from metrics.jsonl (later lines win), without its wall-clock stamp and speeds."""
    out = {}
    with open(f"{run_dir}/metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            out[record["step"]] = {k: v for k, v in record.items() if k.startswith(("loss", "val_loss", "data/"))}
    return out


def assert_same_trajectory(got: dict[int, float], expected: dict[int, float]) -> None:
    """Two 10-step runs' losses (``losses``) agree at every step to a relative 1e-5: the distributed tests' bar."""
    assert sorted(got) == sorted(expected) == list(range(1, 11))
    for step, loss in expected.items():
        assert abs(got[step] - loss) / abs(loss) < 1e-5, step


def count_newton_schulz_calls() -> list[int]:
    """Count Muon's Newton-Schulz calls in this process from now on: one entry per call (how a test checks that
    sharded engines share that work instead of repeating it on every rank)."""
    import lrm_train.optim.muon as muon_module

    real, calls = muon_module.newton_schulz, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    muon_module.newton_schulz = counting
    return calls
