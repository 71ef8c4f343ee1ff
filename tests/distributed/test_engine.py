"""The engines in one process: the single engine, and DDP joined to a one-rank process group (no launcher needed)."""

import math
import types

import pytest
import torch
import torch.distributed as dist

from lrm_train.distributed import DDPEngine, DistConfig, Engine, EngineName, ProcessBackend, build_engine
from lrm_train.optim import AdamW, ParamClass, clipped_norm


def test_single_engine_is_one_rank_without_communication():
    engine = build_engine(DistConfig(name="single", device="cpu"))
    assert (engine.rank, engine.world_size, engine.is_main) == (0, 1, True)
    assert engine.all_gather_object({"a": 1}) == [{"a": 1}]
    tensor = torch.tensor([2.0])
    assert engine.all_reduce_mean(tensor) is tensor


def test_ddp_engine_joins_the_launched_group_through_its_own_constructor(one_rank_launch):
    engine = build_engine(DistConfig(name="ddp", device="cpu"))
    assert isinstance(engine, DDPEngine) and dist.is_initialized()
    assert (engine.rank, engine.world_size, engine.device.type) == (0, 1, "cpu")
    assert engine.all_gather_object("x") == ["x"]
    torch.testing.assert_close(engine.all_reduce_mean(torch.tensor([3.0])), torch.tensor([3.0]))
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert engine.setup(model, optimizer, {}) is optimizer
    assert isinstance(engine.model, torch.nn.parallel.DistributedDataParallel) and engine.module is model
    engine.barrier()
    engine.close()
    assert not dist.is_initialized()


def test_zero_engine_is_composed_not_a_ddp_engine():
    from lrm_train.distributed.zero import ZeroEngine

    assert issubclass(ZeroEngine, Engine) and not issubclass(ZeroEngine, DDPEngine)


def test_an_engine_that_needs_a_launcher_says_so(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="dist=ddp needs a launcher"):
        DDPEngine(DistConfig(name="ddp"))


class WithMultiplier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3, 3))
        self.lrm_row = torch.nn.Parameter(torch.ones(3))


def engine_for(name: str, clip_multipliers: bool = False):
    engine = build_engine(DistConfig(name=name, device="cpu"))
    model = WithMultiplier()
    classes = {"weight": ParamClass.MATRIX, "lrm_row": ParamClass.MULTIPLIER}
    optimizer = AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.95), weight_decay=0.0)
    return engine, model, engine.setup(model, optimizer, classes, clip_multipliers=clip_multipliers)


@pytest.mark.parametrize("name", ["single", "ddp"])
@pytest.mark.parametrize("bad", ["loss", "multiplier_grad", "matrix_grad", "none"])
def test_a_step_is_applied_only_if_the_loss_and_every_gradient_are_finite(one_rank_launch, name, bad):
    engine, model, optimizer = engine_for(name)
    model.weight.grad = torch.full((3, 3), 0.5)
    model.lrm_row.grad = torch.full((3,), 0.5)
    if bad == "multiplier_grad":  # not in the clipped norm (clip_multipliers=False), still refused
        model.lrm_row.grad[1] = float("inf")
    if bad == "matrix_grad":
        model.weight.grad[0, 0] = float("nan")
    norms, applied = engine.optimizer_step(max_norm=1.0, loss_is_finite=torch.tensor(bad != "loss"))
    assert applied.shape == () and bool(applied) == (bad == "none")
    if bad == "none":
        torch.testing.assert_close(norms.clipped, torch.tensor(1.5))  # the clipped classes only: sqrt(9 * 0.25)
        # AdamW's first moment after one step is (1 - beta1) * the gradient it was given: clipped, or not.
        state = optimizer.state
        torch.testing.assert_close(
            state[model.weight]["exp_avg"], torch.full((3, 3), 0.1 * 0.5 / 1.5), rtol=1e-6, atol=0
        )
        torch.testing.assert_close(state[model.lrm_row]["exp_avg"], torch.full((3,), 0.1 * 0.5))
        assert not torch.equal(model.weight.detach(), torch.ones(3, 3))
    else:
        assert torch.equal(model.weight.detach(), torch.ones(3, 3)) and torch.equal(
            model.lrm_row.detach(), torch.ones(3)
        )
        assert all(float(s["step"]) == 0 for s in optimizer.state.values())
    assert model.weight.grad is None and model.lrm_row.grad is None


class FakeDeepSpeed:
    def __init__(self) -> None:
        self.steps = 0

    def step(self) -> None:
        self.steps += 1


@pytest.mark.parametrize(
    "group_norms,loss_is_finite,applied",
    [
        ([3.0, 4.0], True, True),
        ([3.0, 4.0], False, False),  # the non-finite loss branch
        ([3.0, float("inf")], True, False),  # a non-finite multiplier gradient, outside the clipped norm
        ([float("nan"), 4.0], True, False),
    ],
)
def test_zero_skips_by_the_same_rule(group_norms, loss_is_finite, applied):
    from lrm_train.distributed.zero import ZeroEngine

    engine = object.__new__(ZeroEngine)
    engine.clip_multipliers = False
    engine.client = types.SimpleNamespace(
        param_groups=[{"param_class": "matrix"}, {"param_class": "multiplier"}], apply=None
    )
    engine._group_norms = lambda: [torch.tensor(n) for n in group_norms]
    engine.ds = FakeDeepSpeed()
    norms, stepped = engine.optimizer_step(max_norm=1.5, loss_is_finite=torch.tensor(loss_is_finite))
    assert bool(stepped) == applied and engine.client.apply is stepped
    assert engine.ds.steps == 1  # DeepSpeed always steps (it clears its gradients); the client skips the update
    if applied:
        torch.testing.assert_close(norms.clipped, torch.tensor(3.0))
        torch.testing.assert_close(norms.multipliers, torch.tensor(4.0))
        matrix, multiplier = (g["grad_scale"] for g in engine.client.param_groups)
        torch.testing.assert_close(matrix, torch.tensor(1.5 / (3.0 + 1e-6)))
        assert multiplier is None  # not clipped


@pytest.mark.parametrize("name", ["single", "ddp"])
@pytest.mark.parametrize("clip_multipliers", [False, True])
def test_clip_multipliers_decides_what_the_clipped_norm_holds(one_rank_launch, name, clip_multipliers):
    engine, model, optimizer = engine_for(name, clip_multipliers)
    model.weight.grad = torch.full((3, 3), 0.5)  # norm 1.5
    model.lrm_row.grad = torch.full((3,), 2.0)  # norm sqrt(12): dominates a norm that holds it, as in §4.3
    norms, _ = engine.optimizer_step(max_norm=1.0, loss_is_finite=torch.tensor(True))
    clipped = math.sqrt(2.25 + 12.0) if clip_multipliers else 1.5
    torch.testing.assert_close(norms.clipped, torch.tensor(clipped))
    torch.testing.assert_close(norms.multipliers, torch.tensor(math.sqrt(12.0)))
    # AdamW's first moment after one step is (1 - beta1) * the gradient it was given.
    scale = 1.0 / (clipped + 1e-6)
    exp_avg = {p: s["exp_avg"] for p, s in optimizer.state.items()}
    torch.testing.assert_close(exp_avg[model.weight], torch.full((3, 3), 0.1 * 0.5 * scale))
    multiplier_scale = scale if clip_multipliers else 1.0
    torch.testing.assert_close(exp_avg[model.lrm_row], torch.full((3,), 0.1 * 2.0 * multiplier_scale))


@pytest.mark.parametrize("clip_multipliers", [False, True])
def test_every_engine_clips_through_the_one_shared_function(one_rank_launch, monkeypatch, clip_multipliers):
    from lrm_train.distributed import engine as engine_module
    from lrm_train.distributed import zero
    from lrm_train.distributed.zero import ZeroEngine

    calls = []

    def spy(norms, clip, max_norm):
        norms = list(norms)
        calls.append(([c for c, _ in norms], clip))
        return clipped_norm(norms, clip, max_norm)

    monkeypatch.setattr(engine_module, "clipped_norm", spy)
    monkeypatch.setattr(zero, "clipped_norm", spy)
    for name in ("single", "ddp"):
        engine, model, _ = engine_for(name, clip_multipliers)
        model.weight.grad, model.lrm_row.grad = torch.ones(3, 3), torch.ones(3)
        engine.optimizer_step(max_norm=1.0, loss_is_finite=torch.tensor(True))
        engine.close()
    zero_engine = object.__new__(ZeroEngine)
    zero_engine.clip_multipliers = clip_multipliers
    zero_engine.client = types.SimpleNamespace(
        param_groups=[{"param_class": "matrix"}, {"param_class": "multiplier"}], apply=None
    )
    zero_engine._group_norms = lambda: [torch.tensor(3.0), torch.tensor(4.0)]
    zero_engine.ds = FakeDeepSpeed()
    norms, _ = zero_engine.optimizer_step(max_norm=1.0, loss_is_finite=torch.tensor(True))
    expected = [([ParamClass.MATRIX, ParamClass.MULTIPLIER], clip_multipliers)] * 3
    assert calls == expected
    torch.testing.assert_close(norms.clipped, torch.tensor(5.0 if clip_multipliers else 3.0))
    matrix, multiplier = (g["grad_scale"] for g in zero_engine.client.param_groups)
    assert (multiplier is matrix) if clip_multipliers else (multiplier is None)


def test_parameter_shapes_are_full_and_named():
    engine = engine_for("single")[0]
    assert engine.parameter_shapes() == {"weight": torch.Size([3, 3]), "lrm_row": torch.Size([3])}
    assert sum(s.numel() for s in engine.parameter_shapes().values()) == 12  # a count no engine can shrink


def test_bf16_parameters_are_a_zero_option():
    assert DistConfig(name="zero2", bf16_params=True).bf16_params
    with pytest.raises(ValueError, match=r"dist.bf16_params=true needs a ZeRO engine .* not ddp"):
        DistConfig(name="ddp", bf16_params=True)


def test_engine_names_know_their_zero_stage_and_plain_strings_become_the_enums():
    assert {name: name.zero_stage for name in EngineName} == {
        "single": None,
        "ddp": None,
        "zero1": 1,
        "zero2": 2,
        "zero3": 3,
        "fsdp": None,
    }
    cfg = DistConfig(name="zero3", backend="gloo")
    assert cfg.name is EngineName.zero3 and cfg.backend is ProcessBackend.gloo
    with pytest.raises(ValueError, match=r"^dist.name='zero4' is not one of single, ddp, zero1, zero2, zero3, fsdp$"):
        DistConfig(name="zero4")
