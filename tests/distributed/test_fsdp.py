"""FSDP2 on 2 gloo ranks against the single process: its optimizer on DTensor shards, compiled and checkpointed
layers, the trainer end to end, resume across engines and world sizes."""

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from runs import (
    as_args,
    assert_same_trajectory,
    cli,
    count_newton_schulz_calls,
    exit_saved_worker,
    free_port,
    losses,
    micro_config,
    overrides,
    run_config,
)
from safetensors import safe_open
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

from lrm_train.distributed import DistConfig, Engine, build_engine
from lrm_train.distributed.fsdp import FSDPEngine, ShardedAdamWMuon, rows_of_rank
from lrm_train.models import FalconH1LM
from lrm_train.nn import LRMConfig
from lrm_train.optim import (
    AdamW,
    Muon,
    OptimConfig,
    ParamClass,
    build_optimizer,
    classify_parameters,
    set_learning_rates,
)
from lrm_train.train import train
from lrm_train.train.build import wrap_layers
from lrm_train.train.checkpoint import load_checkpoint

# As test_zero.py: clipping is active and the learning rate moves the loss; 2 ranks x 2 sequences = 1 process x 2 x 2.
SETTINGS = {
    "optim.lr": 0.02,
    "train.grad_clip": 0.02,
    "train.max_steps": 10,
    "train.micro_batch_size": 2,
    "train.ckpt_every": 5,
}
ONE_PROCESS = {**SETTINGS, "train.grad_accum": 2}
TWO_RANKS = {**SETTINGS, "train.grad_accum": 1, "dist.name": "fsdp"}


def launched(data_root, run_dir, nproc=2, env=None, **extra):
    settings = TWO_RANKS if nproc == 2 else {**ONE_PROCESS, "dist.name": "fsdp"}
    done = cli(as_args(overrides(data_root, run_dir, **{**settings, **extra})), nproc=nproc, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return losses(run_dir)


def single(data_root, run_dir, **extra):
    return losses(train(run_config(data_root, run_dir, **{**ONE_PROCESS, **extra})).run_dir)


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    dirs = {
        name: train(run_config(data_root, root / name, **ONE_PROCESS, **{"optim.name": name})).run_dir
        for name in ("adamw", "muon")
    }
    return {"dir": dirs, **{name: losses(run_dir) for name, run_dir in dirs.items()}}


def test_rows_of_rank_splits_as_torch_chunk():
    for rows in range(1, 9):
        for world in range(1, 5):
            chunks = list(torch.arange(rows).chunk(world))
            for rank in range(world):
                expected = chunks[rank].tolist() if rank < len(chunks) else []
                assert list(range(rows))[rows_of_rank(rows, rank, world)] == expected, (rows, rank, world)


def test_fsdp_needs_a_launcher_and_says_so(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="dist=fsdp needs a launcher"):
        build_engine(DistConfig(name="fsdp"))


class WithMultiplier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3, 3))
        self.lrm_row = torch.nn.Parameter(torch.ones(3))

    def fsdp_units(self) -> list[torch.nn.Module]:
        return []  # the root only


@pytest.mark.parametrize("bad", ["loss", "multiplier_grad", "matrix_grad", "none"])
def test_fsdp_applies_a_step_only_if_the_loss_and_every_gradient_are_finite(one_rank_launch, bad):
    engine = build_engine(DistConfig(name="fsdp", device="cpu"))
    model = WithMultiplier()
    classes = {"weight": ParamClass.MATRIX, "lrm_row": ParamClass.MULTIPLIER}
    groups = [{"params": [p], "name": classes[n].value, "use_muon": False} for n, p in model.named_parameters()]
    engine.setup(model, AdamW(groups, lr=0.1, betas=(0.9, 0.95), weight_decay=0.0), classes)
    weight, multiplier = torch.full((3, 3), 0.5), torch.full((3,), 2.0)  # norms 1.5 and sqrt(12)
    if bad == "multiplier_grad":  # not in the clipped norm (clip_multipliers=False), still refused
        multiplier[1] = float("inf")
    if bad == "matrix_grad":
        weight[0, 0] = float("nan")
    for param, grad in ((model.weight, weight), (model.lrm_row, multiplier)):
        param.grad = distribute_tensor(grad, engine.mesh, [Shard(0)])
    norms, applied = engine.optimizer_step(max_norm=1.0, loss_is_finite=torch.tensor(bad != "loss"))
    assert bool(applied) == (bad == "none")
    state = engine.optimizer_state()
    if bad == "none":
        torch.testing.assert_close(norms.clipped, torch.tensor(1.5))  # the clipped classes only
        torch.testing.assert_close(norms.multipliers, torch.tensor(12**0.5))
        # AdamW's first moment after one step is (1 - beta1) * the gradient it was given: clipped, or not.
        torch.testing.assert_close(state["weight"]["exp_avg"], torch.full((3, 3), 0.1 * 0.5 / 1.5), rtol=1e-6, atol=0)
        torch.testing.assert_close(state["lrm_row"]["exp_avg"], torch.full((3,), 0.1 * 2.0))
    else:
        assert torch.equal(model.weight.full_tensor(), torch.ones(3, 3))
        assert torch.equal(model.lrm_row.full_tensor(), torch.ones(3))
        assert all(float(s["step"]) == 0 for s in state.values())
    assert model.weight.grad is None and model.lrm_row.grad is None
    assert [row["numel"] for row in engine.class_rows()] == [9, 3]  # the full parameters, not this rank's rows
    assert engine.parameter_shapes() == {"weight": (3, 3), "lrm_row": (3,)}


# Shapes shared by several matrices (their chunks), a lone one, rows that do not split evenly, a row for one rank only.
SHAPES = [(8, 12), (12, 8), (8, 12), (5, 6), (8, 12), (1, 4)]
HYPER = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=True, ns_steps=5, eps=1e-7)


def _muon_worker(rank, world, folder, weights, grads):
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    calls = count_newton_schulz_calls()
    mesh = init_device_mesh("cpu", (world,))
    params = [torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)])) for w in weights]
    group = {"params": params, **HYPER, "ns_dtype": "float32", "adjust_lr": "match_rms_adamw", "use_muon": True}
    client = ShardedAdamWMuon([group], rank, world)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        client.step(apply=torch.tensor(True))
    applied = [p.full_tensor() for p in params]
    # A step with NaN gradients that the engine refused changes nothing.
    momenta = [client.state[p]["momentum_buffer"].clone() for p in params]
    for p in params:
        p.grad = distribute_tensor(torch.full(p.shape, float("nan")), mesh, [Shard(0)])
    client.step(apply=torch.tensor(False))
    unchanged = all(torch.equal(p.full_tensor(), a) for p, a in zip(params, applied)) and all(
        torch.equal(client.state[p]["momentum_buffer"], m) for p, m in zip(params, momenta)
    )
    torch.save((applied, len(calls), unchanged), f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()
    exit_saved_worker()


@pytest.mark.multiprocess
def test_muon_on_row_shards_matches_one_process_and_shares_newton_schulz(tmp_path):
    torch.manual_seed(0)
    weights = [torch.randn(s) for s in SHAPES]
    grads = [[torch.randn(s) for s in SHAPES] for _ in range(3)]
    single = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = Muon(single, **HYPER, ns_dtype="float32", share_across_ranks=False)
    for step_grads in grads:
        for p, g in zip(single, step_grads):
            p.grad = g.clone()
        opt.step()
    mp.start_processes(_muon_worker, args=(2, str(tmp_path), weights, grads), nprocs=2, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for applied, _, unchanged in results:
        assert unchanged
        for got, expected in zip(applied, single):
            torch.testing.assert_close(got, expected.detach(), rtol=1e-6, atol=1e-7)
    # 4 steps (the skipped one too); chunks per step: (8, 12) x 3 -> two, (12, 8), (5, 6), (1, 4) -> one each.
    # Rank 0 takes the first matrix of every chunk (5), rank 1 the second of the first (8, 12) chunk only.
    assert [calls for _, calls, _ in results] == [4 * 5, 4 * 1]


def micro_model() -> FalconH1LM:
    torch.manual_seed(0)
    return FalconH1LM(micro_config(), LRMConfig("full"))


def take_steps(engine, model, batches, rank: int = 0, world: int = 1) -> list[float]:
    """AdamW steps with clipping on ``batches``, each rank on its share of every batch; the mean losses."""
    classes = classify_parameters(model)
    optimizer = engine.setup(model, build_optimizer(model, classes, OptimConfig(name="adamw")), classes)
    set_learning_rates(optimizer, 0.01)
    out = []
    for x, y in batches:
        share = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        loss = engine.model(x[share], y[share]).loss
        engine.backward(loss)
        engine.optimizer_step(0.05, torch.isfinite(loss))
        out.append(engine.all_reduce_mean(loss.detach()).item())
    return out


def _compiled_worker(rank, world, folder, port, batches):
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()})
    engine = FSDPEngine(DistConfig(name="fsdp", device="cpu"))
    model = micro_model()
    wrap_layers(model.layers, compile=True, activation_checkpointing=True, compile_backend="aot_eager")
    got = take_steps(engine, model, batches, rank, world)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch.save((got, graphs, engine.model_state()), f"{folder}/rank{rank}.pt")
    engine.close()
    exit_saved_worker()


@pytest.mark.multiprocess
@pytest.mark.compile
def test_compiled_and_checkpointed_layers_under_fsdp_match_the_plain_model(tmp_path):
    batches = [(torch.randint(0, 512, (4, 16)), torch.randint(0, 512, (4, 16))) for _ in range(3)]
    plain = micro_model()
    expected = take_steps(Engine(DistConfig(device="cpu")), plain, batches)
    args = (2, str(tmp_path), free_port(), batches)
    mp.start_processes(_compiled_worker, args=args, nprocs=2, start_method="spawn")
    for rank in range(2):
        got, graphs, state = torch.load(tmp_path / f"rank{rank}.pt")
        assert graphs > 0  # it did compile
        assert got == pytest.approx(expected, rel=1e-5)
        for name, tensor in plain.state_dict().items():  # weights of about 0.1, summed in another order
            torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.multiprocess
@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_fsdp_matches_the_single_process_trainer(data_root, tmp_path, reference, optim):
    got = launched(data_root, tmp_path, **{"optim.name": optim})
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
    # The trajectories are taken from whole parameters, and the clipping norm from the shards equals the whole one.
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    expected = json.loads((reference["dir"][optim] / "metrics.jsonl").read_text().splitlines()[-1])
    for key in (
        "grad_norm",
        "norm/layers.0.self_attn.q_proj",
        "lrm/layers.1.mamba.out_proj.lrm_row/max",
        "abm/matrix@hidden/32x32",
    ):
        assert last[key] == pytest.approx(expected[key], rel=1e-5), key


@pytest.mark.multiprocess
def test_fsdp_resumes_exactly_on_itself_and_in_one_process_and_back(data_root, tmp_path, reference):
    muon, adamw = {"optim.name": "muon"}, {"optim.name": "adamw"}
    # fsdp on 2 ranks -> the same, and -> the single-process engine.
    for run in ("same", "shrink"):
        launched(data_root, tmp_path / run, **muon, **{"train.stop_at_step": 5})
    assert_split_by_rank(tmp_path / "same" / "checkpoints" / "step_00000005")
    assert_same_trajectory(launched(data_root, tmp_path / "same", **muon), reference["muon"])
    assert_same_trajectory(single(data_root, tmp_path / "shrink", **muon), reference["muon"])
    # The single-process engine -> fsdp on 2 ranks.
    single(data_root, tmp_path / "grow", **adamw, **{"train.stop_at_step": 5})
    assert_same_trajectory(launched(data_root, tmp_path / "grow", **adamw), reference["adamw"])


def assert_split_by_rank(checkpoint):
    """Each rank wrote its own rows of the model and of the optimizer state: no file holds either whole, and the
    files together hold every element once."""
    full_model, state = load_checkpoint(checkpoint)
    whole = {
        "model": sum(t.numel() for t in full_model.values()),
        "optimizer": sum(t.numel() for entry in state["optimizer"].values() for t in entry.values() if t.ndim > 0),
    }
    for kind, total in whole.items():
        held = []
        for name in (f"{kind}.safetensors", f"{kind}.rank00001.safetensors"):
            with safe_open(checkpoint / name, "pt") as f:
                shapes = [f.get_slice(key).get_shape() for key in f.keys()]  # noqa: SIM118
                held.append(sum(math.prod(shape) for shape in shapes if shape))  # the step counts (0-d) left out
        assert sum(held) == total and all(0 < count < total for count in held), (kind, held, total)


@pytest.mark.multiprocess
def test_a_zero3_run_resumes_under_fsdp_on_one_rank(data_root, tmp_path, tmp_path_factory, reference):
    zero3 = {"dist.name": "zero3", "dist.zero3_persistence_threshold": 0, "train.stop_at_step": 5}
    jit = {"TORCH_EXTENSIONS_DIR": str(tmp_path_factory.mktemp("torch_extensions"))}
    launched(data_root, tmp_path, env=jit, **{"optim.name": "muon", **zero3})
    assert_same_trajectory(launched(data_root, tmp_path, nproc=1, **{"optim.name": "muon"}), reference["muon"])


@pytest.mark.multiprocess
def test_an_fsdp_run_resumes_under_zero3(data_root, tmp_path, tmp_path_factory, reference):
    # The other direction: fsdp's row pieces put back together and cut into DeepSpeed's flat ZeRO-3 shards.
    launched(data_root, tmp_path, **{"optim.name": "adamw", "train.stop_at_step": 5})
    jit = {"TORCH_EXTENSIONS_DIR": str(tmp_path_factory.mktemp("torch_extensions"))}
    zero3 = {"dist.name": "zero3", "dist.zero3_persistence_threshold": 0, "optim.name": "adamw"}
    assert_same_trajectory(launched(data_root, tmp_path, env=jit, **zero3), reference["adamw"])


# LRs and WDs != 1 per class and per role (matrices and multipliers), Muon on two matrix groups.
PER_GROUP = {
    "optim.name": "muon",
    "optim.embedding.lr_mult": 2.0,
    "optim.norm.lr_mult": 0.5,
    "optim.roles": "[{pattern:'attn.*',lr_mult:0.5},{pattern:ssm.dt,multipliers:true,lr_mult:3.0,wd_mult:2.0}]",
}


@pytest.mark.multiprocess
def test_fsdp_keeps_per_role_learning_rates_and_accumulates_micro_batches(data_root, tmp_path, reference):
    expected = single(data_root, tmp_path / "one", **PER_GROUP)
    assert expected[10] != reference["muon"][10]  # the groups change the run, so the comparison means something
    # 2 ranks x 2 micro-batches of 1 sequence: the global batch of 4 again, gradients reduced after the second only.
    accumulated = {"train.micro_batch_size": 1, "train.grad_accum": 2}
    assert_same_trajectory(launched(data_root, tmp_path / "fsdp", **PER_GROUP, **accumulated), expected)
    table = (tmp_path / "fsdp" / "train_rank0.log").read_text()
    assert any(line.split()[:4] == ["matrix/attn.*@hidden", "8", "6,144", "muon"] for line in table.splitlines()), table


class Matmul(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2, 2))
        self.seen = []

    def forward(self, x):
        self.seen.append(self.weight.dtype)  # the gathered copy
        return x @ self.weight

    def fsdp_units(self) -> list[torch.nn.Module]:
        return []


@pytest.mark.parametrize("autocast, gathered", [(None, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_fsdp_gathers_parameters_in_the_trainers_compute_dtype(one_rank_launch, autocast, gathered):
    engine = build_engine(DistConfig(name="fsdp", device="cpu"))
    model = Matmul()
    groups = [{"params": [model.weight], "name": "matrix", "use_muon": False}]
    engine.setup(model, AdamW(groups), {"weight": ParamClass.MATRIX}, autocast=autocast)
    assert model.weight.to_local().dtype == torch.float32  # the shard stays float32
    engine.model(torch.ones(1, 2))
    assert model.seen == [gathered]
