"""Width scaling of the learned multipliers: which power of the width do they pick?

    python -m lrm_train.experiments.width_scaling [experiment=width_scaling_gpu] [key=value ...]

Trains the same model family at each width with the same lr and wd (``lrm=full`` started at 1, frozen norm weights as
in the paper), reads the learned multipliers of the final checkpoint and fits ``value = a * width^p`` with a 95%
confidence interval for three quantities, each the geometric mean of its magnitude over layers (and heads):
- ``lm_head_scalar``: the LM head's learnable scalar;
- ``ssm_dt``: the dt section of each Mamba in_proj, mean row multiplier times mean column multiplier;
- ``qk_product``: per attention head, the mean over the head's dimensions of q-row times k-row multipliers (the
  k head its query head reads).
The paper (widths 2^7..2^13, 12 layers): about d^-1 for the LM head and SSM dt, d^-2 for the QK product, slightly
slower than muP predicts.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lrm_train.experiments.analysis import (
    check_width_sweep,
    final_weights,
    power_law_fit,
    width_overrides,
)
from lrm_train.experiments.experiment import Experiment, ExperimentSettings, finished
from lrm_train.experiments.report import markdown_table, new_figure, save_figure, write_report
from lrm_train.experiments.runner import RunSpec, create_out_dir, make_run
from lrm_train.nn import Parametrization

PAPER_EXPONENTS = {"lm_head_scalar": -1.0, "ssm_dt": -1.0, "qk_product": -2.0}


@dataclass
class WidthScalingSettings(ExperimentSettings):
    out_dir: str = "experiments/width_scaling"
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    layers: int = 2
    head_dim: int = 32
    trainer: list[str] = field(default_factory=list)  # lr, wd, data and length: the same for every width

    def __post_init__(self) -> None:
        super().__post_init__()
        check_width_sweep(self.widths, self.layers, self.head_dim, "the exponent fit")


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(abs(v)) for v in values) / len(values))


def learned_multipliers(weights: dict[str, torch.Tensor], head_dim: int, heads_per_kv: int) -> dict[str, float]:
    """The three quantities of the module docstring from a model state."""
    layers = sorted({int(k.split(".")[1]) for k in weights if k.startswith("layers.")})
    dt = [
        float(
            weights[f"layers.{i}.mamba.in_proj.dt.lrm_row"].mean()
            * weights[f"layers.{i}.mamba.in_proj.dt.lrm_col"].mean()
        )
        for i in layers
    ]
    qk = []
    for i in layers:
        q = weights[f"layers.{i}.self_attn.q_proj.lrm_row"].view(-1, head_dim)
        k = weights[f"layers.{i}.self_attn.k_proj.lrm_row"].view(-1, head_dim).repeat_interleave(heads_per_kv, dim=0)
        qk += [float(v) for v in (q * k).mean(dim=1)]
    return dict(
        lm_head_scalar=float(weights["lm_head.lrm_scalar"][0]),
        ssm_dt=geometric_mean(dt),
        qk_product=geometric_mean(qk),
    )


def plan(settings: WidthScalingSettings) -> list[RunSpec]:
    runs = []
    for width in settings.widths:
        overrides = [
            "lrm=full",
            "lrm.init=one",
            "optim.norm.lr_mult=0",
            # The paper's setup: the fixed multipliers stay the same at every width, so that the learnable ones have
            # the width scaling to find themselves.
            *width_overrides(width, settings.layers, settings.head_dim, Parametrization.standard),
            *settings.trainer,
        ]
        run_dir = Path(settings.out_dir) / "runs" / f"w{width}"
        runs.append(make_run(f"width_{width}", run_dir, overrides, width=width))
    return runs


def report(settings: WidthScalingSettings, runs: list[RunSpec]) -> Path:
    out_dir = create_out_dir(settings.out_dir)
    values = {}
    for spec in finished(runs):
        width = spec.labels["width"]
        heads_per_kv = spec.cfg.model.num_attention_heads // spec.cfg.model.num_key_value_heads
        values[width] = learned_multipliers(final_weights(spec.run_dir), settings.head_dim, heads_per_kv)
    fits = {q: power_law_fit(settings.widths, [values[w][q] for w in settings.widths]) for q in PAPER_EXPONENTS}

    fig, axes = new_figure(len(PAPER_EXPONENTS), "learned multipliers against width")
    for ax, (quantity, fit) in zip(axes, fits.items()):
        measured = [abs(values[w][quantity]) for w in settings.widths]
        ax.loglog(settings.widths, measured, "o", label="learned")
        ax.loglog(
            settings.widths,
            [fit["prefactor"] * w ** fit["exponent"] for w in settings.widths],
            "-",
            label=f"fit d^{fit['exponent']:.2f}",
        )
        paper = PAPER_EXPONENTS[quantity]
        anchor = measured[0] / settings.widths[0] ** paper
        ax.loglog(settings.widths, [anchor * w**paper for w in settings.widths], "k--", label=f"paper d^{paper:g}")
        ax.set(title=quantity, xlabel="width")
        ax.legend(fontsize=7)
    figure = save_figure(fig, out_dir / "width_scaling.png")

    table = [
        [
            q,
            f["exponent"],
            f"{f['ci95'][0]:.2f}..{f['ci95'][1]:.2f}",
            PAPER_EXPONENTS[q],
            "yes" if f["ci95"][0] <= PAPER_EXPONENTS[q] <= f["ci95"][1] else "no",
        ]
        for q, f in fits.items()
    ]
    value_rows = [[w, *(values[w][q] for q in PAPER_EXPONENTS)] for w in settings.widths]
    text = f"""
Widths {settings.widths}, {settings.layers} layers, heads of {settings.head_dim}, `lrm=full lrm.init=one`, frozen
norm weights, the same lr and wd at every width; trainer overrides {settings.trainer}.

## Fitted exponents (value ∝ width^p, 95% CI from {len(settings.widths)} widths)

{markdown_table(["quantity", "p (ours)", "95% CI", "p (paper)", "paper's p inside our CI"], table)}

![width scaling]({figure})

## Learned values

{markdown_table(["width", *PAPER_EXPONENTS], value_rows)}
"""
    data = dict(
        settings=dataclasses.asdict(settings),
        fits=fits,
        paper_exponents=PAPER_EXPONENTS,
        values={str(w): v for w, v in values.items()},
    )
    path = write_report(out_dir, "Width scaling of the learned multipliers", text, data)
    for q, f in fits.items():
        print(
            f"width_scaling: {q}: d^{f['exponent']:.2f} (95% CI {f['ci95'][0]:.2f}..{f['ci95'][1]:.2f}); "
            f"paper d^{PAPER_EXPONENTS[q]:g}"
        )
    return path


WIDTH_SCALING = Experiment("width_scaling", WidthScalingSettings, plan, report, __doc__)
run, main = WIDTH_SCALING.run, WIDTH_SCALING.main


if __name__ == "__main__":
    sys.exit(main())
