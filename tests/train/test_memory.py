"""The per-rank memory estimate (``train.memory``, ``--estimate``) against what a run really holds on CPU: the states
byte for byte, the activations within 4% of the tensors autograd saves, a training step's peak within 10%."""

import importlib.util
from pathlib import Path

import pytest
import torch

from lrm_train.distributed import EngineName
from lrm_train.models import FalconH1LM
from lrm_train.optim import build_optimizer, classify_parameters
from lrm_train.train.__main__ import main
from lrm_train.train.config import compose
from lrm_train.train.memory import ENGINES, REDUCE_BUCKET_ELEMENTS, Target, activations, estimate

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["train.micro_batch_size=2", "data.seq_len=128"]


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def single(cfg):
    return estimate(cfg, [1])[0]


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_weights_gradients_and_optimizer_state_are_the_bytes_a_step_allocates(optim):
    cfg = compose([*SMALL, f"optim={optim}"])
    model = FalconH1LM(cfg.model, cfg.lrm)
    optimizer = build_optimizer(model, classify_parameters(model), cfg.optim)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 128))
    model(ids, ids, 0.0).loss.backward()
    grads = tensor_bytes(p.grad for p in model.parameters())
    optimizer.step()
    state = tensor_bytes(t for s in optimizer.state.values() for t in s.values())
    row = single(cfg)
    assert (row.weights, row.gradients, row.optimizer) == (tensor_bytes(model.parameters()), grads, state)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["data.seq_len=100"],
        ["lrm=none"],
        ["model.mamba_rms_norm=true"],
        ["model.num_key_value_heads=4"],
        ["train.precision=bf16"],
    ],
    ids=["tiny", "seq-not-whole-chunks", "lrm-none", "mamba-rms-norm", "no-gqa", "bf16-autocast"],
)
def test_activations_are_the_tensors_the_forward_saves_for_backward(overrides):
    cfg = compose([*SMALL, *overrides])
    model = FalconH1LM(cfg.model, cfg.lrm)
    held = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in held:  # views of one storage count once
            saved[storage._cdata] = storage.nbytes()
        return tensor

    ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=Target.of(cfg).bf16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        model(ids, ids, 1e-4)
    expected = activations(cfg, Target.of(cfg), checkpointing=False).saved
    assert expected == pytest.approx(sum(saved.values()), rel=0.04)


def test_checkpointing_keeps_each_layers_input_and_rebuilds_one_layer():
    cfg = compose(SMALL)
    plain = activations(cfg, Target.of(cfg), checkpointing=False)
    kept = activations(cfg, Target.of(cfg), checkpointing=True)
    tokens, layers = 2 * 128, cfg.model.num_hidden_layers
    layer = (plain.saved - kept.saved + layers * tokens * cfg.model.hidden_size * 4) / layers
    assert kept.peak_extra >= layer
    assert kept.peak < plain.peak


def load_script():
    spec = importlib.util.spec_from_file_location("estimate_memory", ROOT / "scripts" / "estimate_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_estimate_is_within_10_percent_of_the_measured_peak_of_training_steps(checkpointing):
    overrides = [*SMALL, "model.num_hidden_layers=2", f"train.activation_checkpointing={checkpointing}"]
    row = single(compose(overrides))
    expected = row.total_checkpointed if checkpointing else row.total
    assert expected == pytest.approx(load_script().measured_peak(overrides), rel=0.10)


def test_every_engine_has_its_sharding_and_sharded_states_shrink_with_the_world():
    assert set(ENGINES) == set(EngineName)
    cfg = compose(["model=falcon_h1_0p5b"])
    rows = {(r.engine, r.world_size): r for r in estimate(cfg, [2, 8])}
    assert set(rows) == {(name, n) for name in ENGINES if name != "single" for n in (2, 8)}
    ddp, zero1, zero2, zero3 = (rows[(name, 8)] for name in ("ddp", "zero1", "zero2", "zero3"))
    full = sum(p.numel() for p in FalconH1LM(cfg.model, cfg.lrm).parameters()) * 4
    assert ddp.weights == full and ddp.gradients == 2 * full  # DDP's buckets: a second copy
    bucket = REDUCE_BUCKET_ELEMENTS * 4
    assert zero1.gradients == full + bucket
    assert zero1.optimizer == zero2.optimizer == pytest.approx(2 * full / 8, rel=1e-3)
    assert zero1.weights == zero2.weights == pytest.approx(full + full / 8, rel=1e-3)  # the float32 master shard
    assert zero2.gradients == pytest.approx(full / 8 + bucket, rel=1e-3)
    assert full / 8 < zero3.weights < zero2.weights  # its shard and the largest block gathered whole
    assert rows[("zero3", 2)].optimizer > 3 * zero3.optimizer
    assert ddp.activations == zero3.activations  # a micro-batch's activations do not depend on the engine


def test_bf16_parameters_halve_zeros_weights_and_gradients_but_not_ddps():
    plain = compose(["model=falcon_h1_0p5b", "dist=zero3"])
    bf16 = compose(["model=falcon_h1_0p5b", "dist=zero3", "dist.bf16_params=true"])
    before, after = ({(r.engine, r.world_size): r for r in estimate(c, [8])} for c in (plain, bf16))
    assert after[("ddp", 8)] == before[("ddp", 8)]
    assert after[("zero3", 8)].optimizer == before[("zero3", 8)].optimizer
    master = before[("zero3", 8)].weights - after[("zero3", 8)].weights
    assert 0 < master < before[("zero3", 8)].weights / 2  # the float32 master shard stays
    assert after[("zero1", 8)].gradients < before[("zero1", 8)].gradients


def test_bf16_autocast_halves_the_activations_but_not_the_float32_parts():
    cpu, cuda = compose(SMALL), compose([*SMALL, "dist.device=cuda", "model.ssd_backend=torch"])
    assert Target.of(cuda).bf16 and not Target.of(cpu).bf16
    full, half = (activations(c, Target.of(c), checkpointing=False).saved for c in (cpu, cuda))
    assert full / 2 < half < full


def test_the_command_prints_every_engine_at_each_world_size(capsys):
    assert main([*SMALL, "--estimate=1,4"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[:2] for line in out.splitlines()[2:-1]]
    assert rows == [["single", "1"], *([name, n] for n in ("1", "4") for name in ENGINES if name != "single")]
    assert "micro-batch 2 x seq 128" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train.micro_bach=2", "--estimate"], "error: config: unknown config key 'train.micro_bach'"),
        (["--estimate=8,x"], "error: --estimate=8,x: give world sizes as positive integers"),
    ],
)
def test_a_bad_config_or_world_size_fails_with_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)
