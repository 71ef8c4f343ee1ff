"""No host sync per step: finiteness is decided on the device, the loop reads the flags at log steps only."""

import contextlib
import json
import sys

import pytest
import torch
from runs import run_config
from torch.utils._python_dispatch import TorchDispatchMode

from lrm_train.optim.adamw import adamw_update_
from lrm_train.train import open_trainer

# The code under test: the loop, the engines, the optimizers and the callbacks.
OURS = ("lrm_train/train/loop.py", "lrm_train/distributed/", "lrm_train/optim/", "lrm_train/train/callbacks/")
# What makes the host wait for the device (on CUDA): reading a tensor's value or copying it to the CPU.
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def caller_in_our_code() -> str | None:
    """file:line of the innermost frame of our code on the stack (past torch's own Python wrappers), if any."""
    frame = sys._getframe(2)
    while frame is not None and not any(part in frame.f_code.co_filename for part in OURS):
        frame = frame.f_back
    return None if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


class ScalarReads(TorchDispatchMode):
    """Every ``aten._local_scalar_dense``: the op behind every read of a tensor's value, also the ones no Python
    method shows - a 0-d tensor passed where an op takes a number (``torch._foreach_add_(steps, flag)`` picks the
    Scalar overload and reads the flag on the host: a sync per step on CUDA, seen on an H200)."""

    def __init__(self, where: dict, calls: list) -> None:
        super().__init__()
        self.where, self.calls = where, calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and (caller := caller_in_our_code()) is not None:
            self.calls.append((self.where.get("step"), f"{caller} {func}"))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads(monkeypatch, where: dict):
    """Record every read of a tensor's value made from our code, as (where["step"], file:line what)."""
    calls = []

    def counted(name, real):
        def read(self, *args, **kwargs):
            if (caller := caller_in_our_code()) is not None:
                calls.append((where.get("step"), f"{caller} {name}"))
            return real(self, *args, **kwargs)

        return read

    with monkeypatch.context() as patch, ScalarReads(where, calls):
        for name in READS:  # on the CPU these do not all reach the dispatcher (.cpu() of a CPU tensor is itself)
            patch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        yield calls


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_only_log_steps_read_the_device(data_root, tmp_path, monkeypatch, optim):
    settings = {"optim.name": optim, "train.log_every": 3, "train.eval_every": 100, "train.ckpt_every": 100}
    with open_trainer(run_config(data_root, tmp_path, **settings, **{"train.max_steps": 7})) as trainer:
        where = {}
        real_step = trainer.train_step

        def numbered_step():
            where["step"] = trainer.state.step + 1
            return real_step()

        monkeypatch.setattr(trainer, "train_step", numbered_step)
        with host_reads(monkeypatch, where) as calls:
            trainer.fit()
    steps_that_read = {step for step, _ in calls}
    assert {3, 6} <= steps_that_read <= {3, 6, 7}, calls  # 7: the last step logs, evaluates and checkpoints
    assert [r["step"] for r in records(tmp_path)] == [3, 6, 7]


def poison_gradients(trainer, monkeypatch, bad_steps: set[int]) -> None:
    """A NaN in one gradient at the given steps (1-based), as a diverging model would produce."""
    real = trainer.engine.optimizer_step

    def optimizer_step(max_norm, loss_is_finite):
        if trainer.state.step + 1 in bad_steps:
            next(p for p in trainer.components.model.parameters() if p.grad is not None).grad[0] = float("nan")
        return real(max_norm, loss_is_finite)

    monkeypatch.setattr(trainer.engine, "optimizer_step", optimizer_step)


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_a_nan_gradient_step_changes_nothing_and_reads_nothing(data_root, tmp_path, monkeypatch, optim):
    with open_trainer(run_config(data_root, tmp_path, **{"optim.name": optim, "train.log_every": 100})) as trainer:
        trainer.train_step()  # the optimizer state exists
        poison_gradients(trainer, monkeypatch, {2})
        model, optimizer = trainer.components.model, trainer.optimizer
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
        with host_reads(monkeypatch, {}) as calls:
            result = trainer.train_step()
        assert calls == []
        assert not result.applied
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), weights[name]), name
        assert {id(p) for p in optimizer.state} == set(state)
        for p, s in optimizer.state.items():
            for key, value in s.items():
                assert torch.equal(value, state[id(p)][key]), key
        trainer.train_step()
        assert not torch.equal(next(model.parameters()).detach(), next(iter(weights.values())))  # it trains on


def test_skipped_steps_are_counted_at_the_next_log_step(data_root, tmp_path, monkeypatch):
    settings = {"train.log_every": 4, "train.eval_every": 100, "train.max_steps": 8}
    with open_trainer(run_config(data_root, tmp_path / "one", **settings)) as trainer:
        poison_gradients(trainer, monkeypatch, {2, 6})
        trainer.fit()
    assert [(r["step"], r["skipped_steps"]) for r in records(tmp_path / "one")] == [(4, 1), (8, 2)]
    assert all(r["loss"] == r["loss"] for r in records(tmp_path / "one"))
    log_lines = (tmp_path / "one" / "train_rank0.log").read_text().splitlines()
    warned = [line.split("step ", 1)[1] for line in log_lines if "step skipped" in line]
    assert warned == [f"{s}: non-finite loss or gradient, step skipped" for s in (2, 6)]


def test_a_run_of_bad_steps_still_stops_the_run_at_the_next_log_step(data_root, tmp_path, monkeypatch):
    settings = {"train.log_every": 4, "train.max_bad_steps": 2, "train.max_steps": 8}
    with open_trainer(run_config(data_root, tmp_path, **settings)) as trainer:
        poison_gradients(trainer, monkeypatch, {2, 3})  # two in a row, then good again: still fatal
        with pytest.raises(RuntimeError, match=r"2 non-finite steps in a row .* at step 3, seen at step 4; .*emerg"):
            trainer.fit()
    assert (tmp_path / "checkpoints" / "emergency_step_00000004" / "checkpoint.json").exists()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("applied", [True, False])
def test_an_adamw_update_reads_nothing_on_either_path(monkeypatch, fused, applied):
    """The fused path is CUDA's default, so the trainer tests above run only the other one here."""
    params = [torch.randn(4, 3), torch.randn(3)]
    grads, states = [torch.randn_like(p) for p in params], [{}, {}]
    apply = torch.tensor(applied)
    with host_reads(monkeypatch, {}) as calls:
        for _ in range(2):  # the state is created, then updated
            adamw_update_(params, grads, states, 1e-3, 0.1, (0.9, 0.95), 1e-8, apply, fused=fused)
    assert calls == []
    assert [s["step"].item() for s in states] == [2.0 if applied else 0.0] * 2
