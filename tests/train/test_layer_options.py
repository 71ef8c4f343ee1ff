"""train.compile and train.activation_checkpointing: the same loss and gradients as the plain model."""

import functools

import pytest
import torch
from runs import GROUPED_HEADS, micro_config, run_config

from lrm_train.models import FalconH1LM
from lrm_train.nn import LRMConfig
from lrm_train.train import compose, open_trainer
from lrm_train.train.build import wrap_layers


def loss_and_grads(compile: bool, activation_checkpointing: bool):
    torch.manual_seed(0)
    model = FalconH1LM(micro_config(**GROUPED_HEADS), LRMConfig("full"))
    # aot_eager: the graphs and their autograd as torch.compile builds them, without inductor's slow C++ build.
    wrap_layers(model.layers, compile, activation_checkpointing, compile_backend="aot_eager")
    mlp_calls = []
    model.layers[0].feed_forward.register_forward_pre_hook(lambda *_: mlp_calls.append(1))
    ids = torch.randint(0, 64, (2, 11))
    out = model(ids[:, :-1], ids[:, 1:], 1e-3)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out.loss.detach(), grads, len(mlp_calls)


@pytest.fixture(scope="module")
def plain():
    return loss_and_grads(compile=False, activation_checkpointing=False)


def test_activation_checkpointing_recomputes_each_layer_and_gives_the_same_gradients_bitwise(plain):
    loss, grads, mlp_calls = loss_and_grads(compile=False, activation_checkpointing=True)
    assert plain[2] == 1 and mlp_calls == 2  # the layer ran again in backward
    assert torch.equal(loss, plain[0])
    for name, grad in grads.items():
        assert torch.equal(grad, plain[1][name]), name


@pytest.mark.compile
@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_compiled_layers_give_the_same_loss_and_gradients(plain, activation_checkpointing):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them: count this case's graphs only
    loss, grads, _ = loss_and_grads(compile=True, activation_checkpointing=activation_checkpointing)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    torch.testing.assert_close(loss, plain[0], rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_run_config_applies_both_options_to_every_layer_and_keeps_the_parameter_names(data_root, tmp_path):
    options = {"train.compile": True, "train.activation_checkpointing": True, "schedule.warmup_steps": 0}
    with open_trainer(run_config(data_root, tmp_path, **options)) as trainer:
        model = trainer.components.model
        for layer in model.layers:  # checkpointing around the compiled forward (the other way dynamo compiles nothing)
            assert isinstance(layer.forward, functools.partial)
            assert layer.forward.func is torch.utils.checkpoint.checkpoint
            assert hasattr(layer.forward.args[0], "_torchdynamo_orig_callable")  # what it checkpoints is compiled
        plain_names = [name for name, _ in FalconH1LM(model.cfg, model.lrm).named_parameters()]
        assert [name for name, _ in model.named_parameters()] == plain_names


def test_compile_with_zero3_is_refused_before_any_work():
    with pytest.raises(ValueError, match="train.compile=true does not work with dist=zero3"):
        compose(["train.compile=true", "dist=zero3"])
    compose(["train.activation_checkpointing=true", "dist=zero3"])  # this one composes with ZeRO-3
