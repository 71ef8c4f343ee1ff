import pytest
import torch
import torch.nn.functional as F

from lrm_train.nn import (
    Learnable,
    LRMConfig,
    MultipliedEmbedding,
    MultipliedLinear,
    fused_linear,
    lm_loss,
    merge_multipliers_,
)

ALL_COMBINATIONS = [Learnable(s, r, c) for s in (False, True) for r in (False, True) for c in (False, True)]


def randomize_multipliers(layer):
    with torch.no_grad():
        for p in layer.multipliers():
            p.copy_(1 + 0.5 * torch.randn_like(p))


@pytest.mark.parametrize("learnable", ALL_COMBINATIONS)
def test_effective_weight_is_m_s_r_w_c(learnable):
    layer = MultipliedLinear(5, 3, multiplier=0.7, learnable=learnable)
    randomize_multipliers(layer)
    s = layer.lrm_scalar if learnable.scalar else torch.tensor(1.0)
    r = layer.lrm_row if learnable.row else torch.ones(3)
    c = layer.lrm_col if learnable.col else torch.ones(5)
    expected = 0.7 * s * r[:, None] * layer.weight * c[None, :]
    torch.testing.assert_close(layer.effective_weight(), expected)
    x = torch.randn(2, 4, 5)
    torch.testing.assert_close(layer(x), x @ expected.T)


def test_multipliers_are_named_float32_vectors():
    layer = MultipliedLinear(5, 3, learnable=Learnable(True, True, True))
    shapes = {n: (p.dtype, p.shape) for n, p in layer.named_parameters()}
    assert shapes == {
        "weight": (torch.float32, (3, 5)),
        "lrm_scalar": (torch.float32, (1,)),
        "lrm_row": (torch.float32, (3,)),
        "lrm_col": (torch.float32, (5,)),
    }


def test_row_col_gradients_match_plain_autograd():
    layer = MultipliedLinear(6, 4, multiplier=1.3, learnable=Learnable(True, True, True)).double()
    randomize_multipliers(layer)
    x = torch.randn(3, 6, dtype=torch.double)
    layer(x).pow(2).sum().backward()
    ours = [p.grad.clone() for p in (layer.weight, layer.lrm_scalar, layer.lrm_row, layer.lrm_col)]
    leaves = [
        p.detach().clone().requires_grad_() for p in (layer.weight, layer.lrm_scalar, layer.lrm_row, layer.lrm_col)
    ]
    w, s, r, c = leaves
    (x @ (1.3 * s * r[:, None] * w * c[None, :]).T).pow(2).sum().backward()
    for got, leaf in zip(ours, leaves):
        torch.testing.assert_close(got, leaf.grad)


def test_paper_gradient_formulas_for_row_and_column():
    layer = MultipliedLinear(6, 4, learnable=Learnable(row=True, col=True)).double()
    randomize_multipliers(layer)
    w_eff = layer.effective_weight()
    grad = torch.randn_like(w_eff)
    w_eff.backward(grad)
    W, r, c = layer.weight.detach(), layer.lrm_row.detach(), layer.lrm_col.detach()
    torch.testing.assert_close(layer.lrm_row.grad, (W * c[None, :] * grad).sum(1))
    torch.testing.assert_close(layer.lrm_col.grad, (r[:, None] * W * grad).sum(0))


@pytest.mark.parametrize("learnable", ALL_COMBINATIONS)
@pytest.mark.parametrize("init", ["one", "mup"])
def test_init_modes_give_the_same_function_and_place_m_as_documented(learnable, init):
    torch.manual_seed(1)
    ref = MultipliedLinear(5, 3, multiplier=0.25, learnable=Learnable())
    torch.manual_seed(1)
    layer = MultipliedLinear(5, 3, multiplier=0.25, learnable=learnable, init=init)
    torch.testing.assert_close(layer.effective_weight(), ref.effective_weight())
    values = [p.detach().unique().tolist() for p in layer.multipliers()]
    if init == "one" or not any(learnable):
        assert layer.forward_multiplier == 0.25 and all(v == [1.0] for v in values)
    else:
        assert layer.forward_multiplier == 1.0 and values[0] == [0.25] and all(v == [1.0] for v in values[1:])


def test_merge_folds_multipliers_and_keeps_the_function():
    emb = MultipliedEmbedding(11, 5, multiplier=3.0, learnable=Learnable(True, True, True))
    lin = MultipliedLinear(5, 7, multiplier=0.5, learnable=Learnable(True, True, True), init="mup")
    model = torch.nn.Sequential(emb, lin)
    for layer in (emb, lin):
        randomize_multipliers(layer)
    ids = torch.randint(0, 11, (2, 9))
    before = model(ids)
    w_eff = lin.effective_weight().detach()
    merge_multipliers_(model)
    assert not any("lrm_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(ids), before)
    # init=mup had moved the muP value into the multipliers: merged, it is the fixed multiplier again
    assert emb.forward_multiplier == 3.0 and lin.forward_multiplier == 0.5
    torch.testing.assert_close(lin.weight.detach(), w_eff / 0.5)


def test_embedding_rows_run_over_the_vocabulary():
    emb = MultipliedEmbedding(11, 5, learnable=Learnable(row=True, col=True))
    assert emb.lrm_row.shape == (11,) and emb.lrm_col.shape == (5,)
    with torch.no_grad():
        emb.lrm_row[3] = 2.0
    ids = torch.tensor([3, 4])
    torch.testing.assert_close(emb(ids), torch.stack([2 * emb.weight[3], emb.weight[4]]).detach())


def test_fused_linear_equals_separate_layers():
    layers = [
        MultipliedLinear(6, n, multiplier=m, learnable=Learnable(True, True, True)) for n, m in ((2, 0.5), (3, 2.0))
    ]
    for layer in layers:
        randomize_multipliers(layer)
    x = torch.randn(4, 6)
    torch.testing.assert_close(fused_linear(x, layers), torch.cat([layer(x) for layer in layers], -1))


@pytest.mark.parametrize("field,value", [("placement", "rows"), ("init", "zero")])
def test_bad_lrm_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"lrm.{field}="):
        LRMConfig(**{field: value})


def test_lm_loss_matches_cross_entropy_and_adds_z_loss():
    logits = torch.randn(2, 5, 13)
    targets = torch.randint(0, 13, (2, 5))
    targets[0, 0] = -100
    out = lm_loss(logits, targets, z_loss_weight=1e-2)
    keep = targets != -100
    torch.testing.assert_close(out.cross_entropy, F.cross_entropy(logits[keep], targets[keep]))
    torch.testing.assert_close(out.z_loss, torch.logsumexp(logits[keep], -1).pow(2).mean())
    torch.testing.assert_close(out.loss, out.cross_entropy + 1e-2 * out.z_loss)
