import copy

import pytest
import torch

from lrm_train.optim import AdamW, adamw_update_

SHAPES = [(16, 24), (7,), (3, 5)]
HYPER = [dict(lr=0.01, weight_decay=0.1), dict(lr=0.003, weight_decay=0.0)]


def run(make_optimizer, steps=5):
    torch.manual_seed(0)
    weights = [torch.randn(s) for s in SHAPES]
    grads = [[torch.randn(s) for s in SHAPES] for _ in range(steps)]
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    groups = [{"params": params[:2], **HYPER[0]}, {"params": params[2:], **HYPER[1]}]
    opt = make_optimizer(groups)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


def test_matches_torch_adamw_bitwise_on_its_single_tensor_path_and_closely_on_foreach():
    common = dict(betas=(0.9, 0.95), eps=1e-8)
    ours, opt = run(lambda groups: AdamW(groups, **common))
    single, torch_opt = run(lambda groups: torch.optim.AdamW(groups, foreach=False, **common))
    foreach, _ = run(lambda groups: torch.optim.AdamW(groups, foreach=True, **common))
    for a, b, c in zip(ours, single, foreach):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)
    for p, q in zip(ours, single):  # the same state, under the same keys
        assert opt.state[p].keys() == torch_opt.state[q].keys()
        for key, value in opt.state[p].items():
            torch.testing.assert_close(value, torch_opt.state[q][key], rtol=0, atol=0)
            assert value.device == torch_opt.state[q][key].device


def test_the_update_function_is_elementwise_so_a_shard_gets_its_slice_of_the_update():
    param, grad = torch.randn(10), torch.randn(10)
    whole, halves = param.clone(), [param[:4].clone(), param[4:].clone()]
    state, states = {}, [{}, {}]
    for _ in range(3):
        adamw_update_(whole, grad, state, 0.01, 0.1, (0.9, 0.95), 1e-8)
        for half, half_grad, half_state in zip(halves, (grad[:4], grad[4:]), states):
            adamw_update_(half, half_grad, half_state, 0.01, 0.1, (0.9, 0.95), 1e-8)
    torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=0)
    assert float(state["step"]) == 3.0


def test_parameters_without_gradient_are_left_alone():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    AdamW([p, q], lr=0.1).step()
    assert not torch.equal(p.detach(), torch.ones(3)) and torch.equal(q.detach(), torch.ones(3))
    assert q not in AdamW([q]).state


@pytest.mark.parametrize("steps", [1, 4])
def test_state_dict_round_trip_continues_identically(steps):
    params, opt = run(lambda groups: AdamW(groups), steps=steps)
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = AdamW([{"params": clone[:2], **HYPER[0]}, {"params": clone[2:], **HYPER[1]}])
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    grads = [torch.randn_like(p) for p in params]
    for o, ps in ((opt, params), (restored, clone)):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        o.step()
    for a, b in zip(params, clone):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
