"""What the paper's analyses (abm, norm_sweep, width_scaling, coord_check) share beyond the experiments' shape
(``experiment.py``) and report helpers: the power-law fit with its confidence interval, the width family's model keys
and the width sweeps' checks of them, and a finished run's weights."""

from __future__ import annotations

import math
from enum import StrEnum
from pathlib import Path

import torch
from safetensors.torch import load_file

from lrm_train.models import width_family
from lrm_train.nn import Parametrization
from lrm_train.optim import OptimizerName
from lrm_train.train.checkpoint import complete_checkpoints


def check_width_sweep(widths: list[int], layers: int, head_dim: int, fit: str) -> None:
    """The settings of a sweep over ``width_overrides``: ``fit`` says what needs 3 widths (they are fitted on logs,
    and the width family divides by head_dim)."""
    if len(widths) < 3:
        raise ValueError(f"widths: {fit} needs 3 widths or more, got {widths}")
    if any(w <= 0 for w in widths):
        raise ValueError(f"widths={widths}: every width must be > 0")
    if len(set(widths)) != len(widths):
        raise ValueError(f"widths={widths} must be distinct")
    for name, value in (("layers", layers), ("head_dim", head_dim)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")


# Two-sided 95% quantiles of Student's t by degrees of freedom (from 31 on the normal's 1.96 is close enough).
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]
_T95 += [2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def power_law_fit(x: list[float], y: list[float]) -> dict:
    """Least-squares fit of ``|y| = a * x**p`` on logs: p with its 95% confidence interval (Student's t).

    A negative value is fitted by its magnitude (a multiplier's sign is one of the model's symmetries)."""
    if len(x) < 3:
        raise ValueError(f"a power-law fit with a confidence interval needs 3 points or more, got {len(x)}")
    lx = [math.log(v) for v in x]
    ly = [math.log(abs(v)) for v in y]
    n = len(lx)
    mx, my = sum(lx) / n, sum(ly) / n
    sxx = sum((a - mx) ** 2 for a in lx)
    slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sxx
    intercept = my - slope * mx
    residual = sum((b - intercept - slope * a) ** 2 for a, b in zip(lx, ly))
    stderr = math.sqrt(residual / (n - 2) / sxx)
    t = t95(n - 2)
    return dict(exponent=slope, ci95=[slope - t * stderr, slope + t * stderr], prefactor=math.exp(intercept), n=n)


def slope_over_seeds(x: list[float], per_seed: list[list[float]]) -> dict:
    """The log-log slope of values against ``x`` measured once per seed (``per_seed[s]``: seed s's value at each x):
    the mean of the seeds' own fitted slopes, with its 95% interval over the seeds (Student's t), the seeds being the
    replicates. One seed: its fit, with the fit's interval. The mean of slopes is the slope of the seeds' geometric
    mean, which one seed's outlying run moves less than an arithmetic mean."""
    fits = [power_law_fit(x, values) for values in per_seed]
    if len(fits) == 1:
        return {**fits[0], "per_seed": [fits[0]["exponent"]]}
    slopes = [f["exponent"] for f in fits]
    mean, ci95 = mean_interval(slopes)
    return dict(exponent=mean, ci95=ci95, n=len(x), per_seed=slopes)


def mean_interval(values: list[float]) -> tuple[float, list[float]]:
    """The mean of two or more replicates and its 95% interval (Student's t)."""
    n = len(values)
    if n < 2:
        raise ValueError(f"an interval over replicates needs 2 or more, got {n}")
    mean = sum(values) / n
    half = t95(n - 1) * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    return mean, [mean - half, mean + half]


def t95(degrees: int) -> float:
    """The two-sided 95% quantile of Student's t with ``degrees`` degrees of freedom."""
    return _T95[degrees - 1] if degrees <= len(_T95) else 1.96


class SweepParametrization(StrEnum):
    """A width sweep's ``parametrization`` setting: one of the model's, or ``mup_multiplier``, each run's optimizer's
    own through-multiplier form (its forward multipliers are derived for one update rule)."""

    standard = "standard"
    mup = "mup"
    mup_multiplier = "mup_multiplier"

    def for_optimizer(self, optimizer: str) -> Parametrization:
        if self is SweepParametrization.mup_multiplier:
            return Parametrization(f"{self.value}_{optimizer}")
        return Parametrization(self.value)


def check_sweep_choices(parametrization: str, optimizers: list[str]) -> SweepParametrization:
    """A width sweep's parametrization (a plain string too) and optimizers, each refused in one ValueError line."""
    if parametrization not in set(SweepParametrization):
        raise ValueError(f"parametrization={parametrization!r} is not one of {', '.join(SweepParametrization)}")
    if not optimizers or len(set(optimizers)) != len(optimizers):
        raise ValueError(f"optimizers={list(optimizers)} must be distinct and name at least one")
    unknown = [name for name in optimizers if name not in set(OptimizerName)]
    if unknown:
        raise ValueError(f"optimizers: {unknown[0]!r} is not one of {', '.join(OptimizerName)}")
    return SweepParametrization(parametrization)


# The CPU sweeps' d_state: fixed across widths (as the width family requires), and small, so the scan stays cheap.
SWEEP_D_STATE = 16


def width_overrides(width: int, layers: int, head_dim: int, parametrization: Parametrization) -> list[str]:
    """Trainer overrides for the model of ``models.width_family(width, layers, head_dim=head_dim)`` under
    ``parametrization`` (the model group's multipliers, the 0.5B values in the ``tiny`` preset, read at width 1024).
    A ``mup_multiplier`` form is the caller's to match to its run's optimizer."""
    shape = width_family(width, layers, head_dim=head_dim, d_state=SWEEP_D_STATE, parametrization=parametrization)
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "mamba_d_ssm", "mamba_n_heads", "mamba_d_head", "mamba_d_state", "mamba_n_groups",
            "parametrization", "base_width", "zero_init_readouts")  # fmt: skip
    values = [f"model.{key}={getattr(shape, key)}" for key in keys]
    return [*values, f"model.mamba_a_init_range=[{','.join(map(str, shape.mamba_a_init_range))}]"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model state of a run's newest complete checkpoint."""
    done = complete_checkpoints(run_dir)
    if not done:
        raise ValueError(f"{run_dir}: no complete checkpoint")
    return load_file(done[-1] / "model.safetensors")
