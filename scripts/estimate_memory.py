"""The memory estimate (``python -m lrm_train.train ... --estimate``) against the measured peak of training steps.

    python scripts/estimate_memory.py            # tiny on CPU: estimate vs measured; then the 0.5B preset's estimate

A step's peak is measured in a child process (Linux): its resident memory at its highest (``VmHWM``, reset after the
warm-up) less what it held after importing torch and running a few steps of a far smaller model (so that libraries
and kernels are loaded).
glibc would keep freed chunks of up to 32 MB in its heap, which the resident size then counts as used: the child
sets ``MALLOC_MMAP_THRESHOLD_`` so every tensor of some size is its own mapping, returned when freed.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import torch

from lrm_train.models import FalconH1LM
from lrm_train.optim import build_optimizer, classify_parameters
from lrm_train.train.build import wrap_layers
from lrm_train.train.config import RunConfig, compose
from lrm_train.train.memory import estimate, format_estimate

ROOT = Path(__file__).resolve().parents[1]
TINY_CASES = [[], ["train.activation_checkpointing=true"], ["optim=muon"], ["train.micro_batch_size=2"]]
LARGE = ["model=falcon_h1_0p5b", "data.seq_len=4096", "train.micro_batch_size=4", "dist.device=cuda"]


def train_steps(cfg: RunConfig, steps: int) -> None:
    """``steps`` optimizer steps of ``cfg``'s model on random tokens, as the single-process trainer takes them."""
    model = FalconH1LM(cfg.model, cfg.lrm)
    wrap_layers(model.layers, cfg.train.compile, cfg.train.activation_checkpointing)
    optimizer = build_optimizer(model, classify_parameters(model), cfg.optim)
    shape = (cfg.train.micro_batch_size, cfg.data.seq_len)
    for _ in range(steps):
        ids, targets = (torch.randint(0, cfg.model.vocab_size, shape) for _ in range(2))
        model(ids, targets, cfg.train.z_loss).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def resident_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (the highest since the last reset) of this process, from /proc."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def child(overrides: list[str]) -> None:
    cfg = compose(overrides)
    warm = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, num_hidden_layers=1, vocab_size=256),
        train=dataclasses.replace(cfg.train, micro_batch_size=1),
        data=dataclasses.replace(cfg.data, seq_len=cfg.model.mamba_chunk_size),
    )
    train_steps(warm, 2)
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from the resident size now
    before = resident_bytes("VmRSS")
    train_steps(cfg, 2)  # the second step holds the optimizer state through its forward and backward
    print(resident_bytes("VmHWM") - before)


def measured_peak(overrides: list[str]) -> int:
    """Bytes at the peak of two training steps of ``overrides``' single-process run, on this CPU."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", *overrides], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


def main() -> None:
    print(f"{'tiny on CPU, 1 process':<40}{'estimate MiB':>14}{'measured MiB':>14}{'ratio':>8}")
    for overrides in TINY_CASES:
        cfg = compose(overrides)
        row = estimate(cfg, [1])[0]
        expected = row.total_checkpointed if cfg.train.activation_checkpointing else row.total
        peak = measured_peak(overrides)
        name = " ".join(overrides) or "defaults"
        print(f"{name:<40}{expected / 2**20:>14.1f}{peak / 2**20:>14.1f}{expected / peak:>8.3f}")
    print()
    print("python -m lrm_train.train " + " ".join(LARGE) + " --estimate=8")
    print(format_estimate(compose(LARGE), [8]))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        main()
