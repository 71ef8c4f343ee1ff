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
        adamw_update_([whole], [grad], [state], 0.01, 0.1, (0.9, 0.95), 1e-8)
        for half, half_grad, half_state in zip(halves, (grad[:4], grad[4:]), states):
            adamw_update_([half], [half_grad], [half_state], 0.01, 0.1, (0.9, 0.95), 1e-8)
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


def test_the_foreach_path_gives_the_per_tensor_numbers():
    # On the CPU the foreach ops loop over the tensors: the numbers must be the per-tensor path's exactly.
    per_tensor, opt_a = run(lambda groups: AdamW(groups, foreach=False), steps=6)
    foreach, opt_b = run(lambda groups: AdamW(groups, foreach=True), steps=6)
    for a, b in zip(per_tensor, foreach):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_a.state[a][key], opt_b.state[b][key], rtol=0, atol=0)
    assert float(opt_a.state[per_tensor[0]]["step"]) == 6.0


def test_the_fused_path_is_torchs_fused_adamw_bitwise():
    # The CUDA default (one fused kernel per group); torch's fused AdamW also runs on the CPU, so it is checked here.
    common = dict(betas=(0.9, 0.95), eps=1e-8)
    ours, opt = run(lambda groups: AdamW(groups, fused=True, **common))
    theirs, torch_opt = run(lambda groups: torch.optim.AdamW(groups, fused=True, **common))
    per_tensor, _ = run(lambda groups: AdamW(groups, **common))
    for a, b, c in zip(ours, theirs, per_tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[a][key], torch_opt.state[b][key], rtol=0, atol=0)


@pytest.mark.parametrize("path", [dict(foreach=False), dict(foreach=True), dict(fused=True)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_skipped_step_leaves_parameters_and_state_bitwise_unchanged(path, bad):
    params, opt = run(lambda groups: AdamW(groups, **path), steps=2)
    before = [p.detach().clone() for p in params]
    state = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    for p in params:
        p.grad = torch.full_like(p, bad)
    opt.step(apply=torch.tensor(False))
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
        for key, value in state[p].items():
            assert torch.equal(opt.state[p][key], value), key
    # The next applied step is the third: the skipped one did not count.
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step(apply=torch.tensor(True))
    assert all(float(opt.state[p]["step"]) == 3.0 for p in params)


@pytest.mark.parametrize("fused", [False, True])
def test_a_skipped_first_step_keeps_the_parameters_finite_and_counts_nothing(fused):
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), float("nan"))
    opt = AdamW([p], lr=0.1, fused=fused)
    opt.step(apply=torch.tensor(False))
    assert torch.equal(p.detach(), torch.ones(3)) and float(opt.state[p]["step"]) == 0.0
    assert torch.equal(opt.state[p]["exp_avg"], torch.zeros(3))
