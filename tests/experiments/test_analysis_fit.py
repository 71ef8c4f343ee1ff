import math
import random
import statistics

import pytest

from lrm_train.experiments.analysis import power_law_fit, slope_over_seeds, width_overrides
from lrm_train.train import compose


def test_power_law_fit_recovers_a_known_exponent_with_its_confidence_interval():
    rng = random.Random(0)
    widths = [64, 128, 256, 512, 1024, 2048]
    values = [3.0 * w**-1.5 * math.exp(rng.gauss(0, 0.05)) for w in widths]
    fit = power_law_fit(widths, values)
    assert fit["exponent"] == pytest.approx(-1.5, abs=0.05)
    assert fit["ci95"][0] < -1.5 < fit["ci95"][1]
    assert 0.01 < fit["ci95"][1] - fit["ci95"][0] < 0.3  # noise 0.05 over 5 octaves: a narrow but real interval
    assert fit["prefactor"] == pytest.approx(3.0, rel=0.3)


def test_power_law_fit_of_exact_data_and_of_negative_values():
    exact = power_law_fit([2, 4, 8], [5 * 2**-2, 5 * 4**-2, -5 * 8**-2])  # a sign flip is a symmetry: magnitudes
    assert exact["exponent"] == pytest.approx(-2.0)
    assert exact["ci95"] == pytest.approx([-2.0, -2.0])
    # A trend that is no power law gets a wide interval, not a confident wrong answer.
    noisy = power_law_fit([1, 2, 4, 8], [1.0, 0.2, 3.0, 0.5])
    assert noisy["ci95"][1] - noisy["ci95"][0] > 2


def test_slope_over_seeds_averages_the_seeds_own_slopes():
    widths = [64, 128, 256, 512]
    per_seed = [[w**slope for w in widths] for slope in (-0.2, 0.0, 0.2, 0.4)]
    fit = slope_over_seeds(widths, per_seed)
    assert fit["per_seed"] == pytest.approx([-0.2, 0.0, 0.2, 0.4])
    half = 3.182 * statistics.stdev([-0.2, 0.0, 0.2, 0.4]) / 2  # t with 3 degrees of freedom, 4 seeds
    assert fit["exponent"] == pytest.approx(0.1) and fit["ci95"] == pytest.approx([0.1 - half, 0.1 + half])
    one = slope_over_seeds(widths, per_seed[:1])  # one seed: its own fit and the fit's interval
    assert one["exponent"] == pytest.approx(-0.2) and one["ci95"] == pytest.approx([-0.2, -0.2])


def test_power_law_fit_needs_three_points():
    with pytest.raises(ValueError, match="3 points"):
        power_law_fit([1, 2], [1, 2])


@pytest.mark.parametrize(("width", "head_dim"), [(64, 32), (256, 32), (1024, 64)])
@pytest.mark.parametrize("parametrization", ["mup", "standard"])
def test_width_overrides_compose_into_the_width_family(width, head_dim, parametrization):
    model = compose(width_overrides(width, 3, head_dim, parametrization)).model
    assert model.hidden_size == width and model.num_hidden_layers == 3
    assert model.intermediate_size == 2 * width and model.mamba_d_ssm == 3 * width // 2
    assert model.num_attention_heads * model.attention_head_dim == width // 2
    assert model.mamba_n_heads * model.mamba_d_head == model.mamba_d_ssm
    assert model.num_key_value_heads == model.num_attention_heads and model.mamba_a_init_range == [1.0, 16.0]
    assert (model.parametrization, model.base_width, model.mamba_d_state) == (parametrization, 1024, 16)


def test_width_overrides_refuse_a_width_the_heads_do_not_divide():
    with pytest.raises(ValueError, match="width 96"):
        width_overrides(96, 2, 32, "mup")
