"""Width scaling of the learned multipliers: which power of the width do they pick?

    python -m lrm_train.experiments.width_scaling [experiment=width_scaling_gpu] [key=value ...] [force=true]

The paper's §4.2 design: the same model family at each width (``models.width_family``: heads of ``head_dim``, d_state
and A's range fixed, MHA) with one lr and wd for every width, learnable multipliers (``multipliers``, scalar ones by
default, started at 1), frozen norm weights, and every fixed forward multiplier 1 (``model.parametrization=standard``
and ``UNIT_MULTIPLIERS``), so that the learnable ones carry the whole width scaling. Matrices at their noise/WD
equilibrium have a width-independent RMS, so a layer's output grows as d unless a multiplier falls as d^-1.

From each run's final checkpoint the report takes three learned quantities, each the geometric mean of its magnitude
over layers (and heads), every multiplier of the matrix counted (scalar x mean row x mean column):
- ``lm_head_scalar``: the LM head's multipliers;
- ``ssm_dt``: those of the dt section of each Mamba in_proj;
- ``qk_product``: per attention head, the q multipliers times the k multipliers of the k head its query head reads.
It fits ``value ∝ width^p`` per seed and gives the seeds' mean p with its 95% t-interval over the seeds (one seed:
the fit's own interval). The paper (widths 2^7..2^13, 12 layers): about d^-1, d^-1 and d^-2, slightly slower than
muP predicts. It also fits, against width, each matrix class's final RMS (flat at equilibrium) and function-level
scales from a probe batch (logits, dt pre-activation), with the multipliers and in a ``control`` without them
(``lrm=none``), where they should grow.

A pre-flight (``preflight.py``) refuses, before any training, a design where a matrix does not reach its
equilibrium (wd·Σlr < 1) or a multiplier cannot travel the d^-1 change across the widths (Σlr < 1 - d_min/d from 1),
unless ``force=true``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lrm_train.experiments.analysis import check_width_sweep, final_weights, slope_over_seeds, width_overrides
from lrm_train.experiments.coord_check import RESULT_FILE, ActivationRMS
from lrm_train.experiments.experiment import Experiment, ExperimentSettings, finished
from lrm_train.experiments.preflight import HEADER, Budget, budgets, refuse_short
from lrm_train.experiments.report import markdown_table, new_figure, save_figure, write_report
from lrm_train.experiments.results import last_logged
from lrm_train.experiments.runner import RunSpec, create_out_dir, make_run
from lrm_train.nn import Parametrization
from lrm_train.train.metrics import NORM_KEY

PAPER_EXPONENTS = {"lm_head_scalar": -1.0, "ssm_dt": -1.0, "qk_product": -2.0}
# Every fixed forward multiplier at 1: the learnable multipliers have the whole width scaling to find.
UNIT_MULTIPLIERS = [
    *(
        f"model.{name}_multiplier=1"
        for name in ("embedding", "lm_head", "key", "attention_in", "attention_out", "ssm_in", "ssm_out")
    ),
    "model.ssm_multipliers=[1,1,1,1,1]",
    "model.mlp_multipliers=[1,1]",
]
# The matrices whose final RMS is fitted against width, by the classes the review names: hidden matrices, the
# LM head, the embedding.
MATRIX_CLASSES = {"hidden": "layers.", "lm_head": "lm_head", "embedding": "embed_tokens"}
# Function-level scales from the probe batch (coord_check's ActivationRMS): the logits and dt before its bias.
FUNCTION_SCALES = {"logits": "logits", "dt pre-activation": "mamba.dt"}
MATRIX_WEIGHTS = ["*proj*.weight", "lm_head.weight", "embed_tokens.weight"]  # every matrix: they must equilibrate
LRM_ARM, CONTROL_ARM = "lrm", "control"


@dataclass
class WidthScalingSettings(ExperimentSettings):
    out_dir: str = "experiments/width_scaling"
    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    layers: int = 2
    head_dim: int = 16
    multipliers: list[str] = field(default_factory=lambda: ["lrm=scalar", "lrm.init=one"])  # the learnable ones
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    control_seeds: list[int] = field(default_factory=lambda: [0])  # lrm=none at each width; [] for none
    force: bool = False  # train a design the pre-flight finds short (the report still shows its table)
    trainer: list[str] = field(default_factory=list)  # lr, wd, data and length: the same for every width

    def __post_init__(self) -> None:
        super().__post_init__()
        check_width_sweep(self.widths, self.layers, self.head_dim, "the exponent fit")
        for name in ("seeds", "control_seeds"):
            seeds = getattr(self, name)
            if len(set(seeds)) != len(seeds) or (name == "seeds" and not seeds):
                raise ValueError(f"{name}={seeds} must be distinct" + (" and name at least one" * (name == "seeds")))


def plan(settings: WidthScalingSettings) -> list[RunSpec]:
    """Every run composed before any trains, labelled by arm, width and seed; then the pre-flight."""
    arms = {LRM_ARM: (settings.multipliers, settings.seeds), CONTROL_ARM: (["lrm=none"], settings.control_seeds)}
    runs = []
    for arm, (arm_overrides, seeds) in arms.items():
        for seed in seeds:
            for width in settings.widths:
                overrides = [
                    *arm_overrides,
                    "optim.norm.lr_mult=0",
                    *width_overrides(width, settings.layers, settings.head_dim, Parametrization.standard),
                    *UNIT_MULTIPLIERS,
                    f"+callbacks.activation_rms._target_={ActivationRMS.__module__}.ActivationRMS",
                    *settings.trainer,
                ]
                name = f"w{width}" + ("" if arm == LRM_ARM else f"_{arm}") + (f"_s{seed}" if seed else "")
                run_dir = Path(settings.out_dir) / "runs" / name
                runs.append(make_run(f"width_{name}", run_dir, overrides, arm=arm, width=width, seed=seed))
    refuse_short(preflight(settings, runs), settings.force)
    return runs


def preflight(settings: WidthScalingSettings, runs: list[RunSpec]) -> list[Budget]:
    """Every matrix must equilibrate; every learnable multiplier, started at 1, must be able to reach d_min/d (the
    d^-1 change from the narrowest width to this one; the QK product's d^-2 is d^-1 on each of q and k)."""
    rows = []
    for run in runs:
        needed = 1 - min(settings.widths) / run.labels["width"]
        travel = {"*.lrm_*": needed} if run.cfg.lrm.placement != "none" else {}
        rows += budgets(run, MATRIX_WEIGHTS, travel)
    return rows


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(abs(v)) for v in values) / len(values))


def _scale(weights: dict[str, torch.Tensor], matrix: str) -> float:
    """The product of a matrix's learnable multipliers' means (scalar, rows, columns: whichever it has)."""
    value = 1.0
    for kind in ("lrm_scalar", "lrm_row", "lrm_col"):
        if f"{matrix}.{kind}" in weights:
            value *= float(weights[f"{matrix}.{kind}"].mean())
    return value


def learned_multipliers(weights: dict[str, torch.Tensor], head_dim: int, heads_per_kv: int) -> dict[str, float]:
    """The three quantities of the module docstring from a model state."""
    layers = sorted({int(k.split(".")[1]) for k in weights if k.startswith("layers.")})
    dt = [_scale(weights, f"layers.{i}.mamba.in_proj.dt") for i in layers]
    qk = []
    for i in layers:
        q_name, k_name = f"layers.{i}.self_attn.q_proj", f"layers.{i}.self_attn.k_proj"
        # Rows differ per head; a scalar and the columns (the input side) scale every head alike.
        shared = 1.0
        for name in (q_name, k_name):
            shared *= _scale({k: v for k, v in weights.items() if not k.endswith("lrm_row")}, name)
        if f"{q_name}.lrm_row" in weights:
            q = weights[f"{q_name}.lrm_row"].view(-1, head_dim)
            k = weights[f"{k_name}.lrm_row"].view(-1, head_dim).repeat_interleave(heads_per_kv, dim=0)
            qk += [shared * float(v) for v in (q * k).mean(dim=1)]
        else:
            qk += [shared] * (weights[f"{q_name}.weight"].shape[0] // head_dim)
    return dict(lm_head_scalar=_scale(weights, "lm_head"), ssm_dt=geometric_mean(dt), qk_product=geometric_mean(qk))


def matrix_norms(run_dir: Path) -> dict[str, float]:
    """Each matrix class's final RMS (geometric mean over its matrices) from the run's last logged norms."""
    last = {k: v for k, v in last_logged(run_dir).items() if k.startswith(NORM_KEY)}
    out = {}
    for cls, prefix in MATRIX_CLASSES.items():
        values = [v for k, v in last.items() if k[len(NORM_KEY) :].startswith(prefix) and v > 0]
        out[cls] = geometric_mean(values)
    return out


def function_scales(run_dir: Path) -> dict[str, float]:
    """The probe batch's RMS of each function-level scale after the last step."""
    last = json.loads((run_dir / RESULT_FILE).read_text())["steps"][-1]
    return {name: last[quantity]["rms"] for name, quantity in FUNCTION_SCALES.items()}


def run_values(run: RunSpec, head_dim: int) -> dict:
    cfg = run.cfg.model
    values = dict(run.labels, matrix_norm=matrix_norms(run.run_dir), function=function_scales(run.run_dir))
    if run.labels["arm"] == LRM_ARM:
        heads_per_kv = cfg.num_attention_heads // cfg.num_key_value_heads
        values["learned"] = learned_multipliers(final_weights(run.run_dir), head_dim, heads_per_kv)
    return values


def _fit(widths: list[int], results: list[dict], arm: str, get) -> dict | None:
    """The slope of ``get(result)`` against width for ``arm``: per seed, then over the seeds."""
    seeds = sorted({r["seed"] for r in results if r["arm"] == arm})
    if not seeds:
        return None
    by = {(r["seed"], r["width"]): get(r) for r in results if r["arm"] == arm}
    fit = slope_over_seeds(widths, [[by[(s, w)] for w in widths] for s in seeds])
    return dict(fit, seeds=len(seeds), interval="over seeds (t)" if len(seeds) > 1 else "regression (one seed)")


def analyse(settings: WidthScalingSettings, results: list[dict]) -> dict:
    """Every fit of the report from the runs' values (``run_values``)."""
    widths = settings.widths
    exponents = {q: _fit(widths, results, LRM_ARM, lambda r, q=q: r["learned"][q]) for q in PAPER_EXPONENTS}
    norms, functions = [], []
    for arm in (LRM_ARM, CONTROL_ARM):
        for cls in MATRIX_CLASSES:
            if fit := _fit(widths, results, arm, lambda r, c=cls: r["matrix_norm"][c]):
                norms.append(dict(arm=arm, quantity=cls, **fit))
        for name in FUNCTION_SCALES:
            if fit := _fit(widths, results, arm, lambda r, n=name: r["function"][n]):
                functions.append(dict(arm=arm, quantity=name, **fit))
    return dict(exponents=exponents, matrix_norms=norms, function_scales=functions)


def report(settings: WidthScalingSettings, runs: list[RunSpec]) -> Path:
    out_dir = create_out_dir(settings.out_dir)
    results = [run_values(run, settings.head_dim) for run in finished(runs)]
    found = analyse(settings, results)
    checks = preflight(settings, runs)
    figure = plot(settings, results, found, out_dir)
    optim = runs[0].cfg.optim
    # AdamW's noise/WD equilibrium of a matrix (abm.py's closed form), which the class's lr and wd multipliers scale.
    found["abm_rms"] = math.sqrt(optim.lr / (2 * optim.weight_decay))
    text = markdown(settings, results, found, checks, figure)
    data = dict(
        settings=dataclasses.asdict(settings),
        paper_exponents=PAPER_EXPONENTS,
        preflight=[dataclasses.asdict(b) for b in checks],
        runs=results,
        **found,
    )
    path = write_report(out_dir, "Width scaling of the learned multipliers", text, data)
    for q, f in found["exponents"].items():
        print(
            f"width_scaling: {q}: d^{f['exponent']:.2f} (95% CI {f['ci95'][0]:.2f}..{f['ci95'][1]:.2f}, "
            f"{f['interval']}); paper d^{PAPER_EXPONENTS[q]:g}"
        )
    return path


def plot(settings: WidthScalingSettings, results: list[dict], found: dict, out_dir: Path) -> str:
    widths = settings.widths
    fig, axes = new_figure(len(PAPER_EXPONENTS) + 2, "learned multipliers, matrix norms and logits against width")
    learned = [r for r in results if r["arm"] == LRM_ARM]
    for ax, (quantity, fit) in zip(axes, found["exponents"].items()):
        ax.loglog([r["width"] for r in learned], [abs(r["learned"][quantity]) for r in learned], "o", label="learned")
        mean = [geometric_mean([r["learned"][quantity] for r in learned if r["width"] == w]) for w in widths]
        paper = PAPER_EXPONENTS[quantity]
        ax.loglog(widths, [mean[0] * (w / widths[0]) ** fit["exponent"] for w in widths], "-", label="fit")
        ax.loglog(widths, [mean[0] * (w / widths[0]) ** paper for w in widths], "k--", label=f"paper d^{paper:g}")
        ax.set(title=f"{quantity}: d^{fit['exponent']:.2f}", xlabel="width")
        ax.legend(fontsize=7)
    norm_ax, logit_ax = axes[-2:]
    for i, arm in enumerate((LRM_ARM, CONTROL_ARM)):
        runs = [r for r in results if r["arm"] == arm]
        for j, cls in enumerate(MATRIX_CLASSES):
            marker = "o" if arm == LRM_ARM else "x"
            label = f"{cls} ({arm})"
            norm_ax.loglog([r["width"] for r in runs], [r["matrix_norm"][cls] for r in runs], marker, color=f"C{j}")
            norm_ax.plot([], [], marker, color=f"C{j}", label=label)
        logits = [r["function"]["logits"] for r in runs]
        logit_ax.loglog([r["width"] for r in runs], logits, "o" if arm == LRM_ARM else "x", color=f"C{i}", label=arm)
    norm_ax.set(title="final matrix RMS", xlabel="width")
    logit_ax.set(title="logit RMS (probe batch)", xlabel="width")
    norm_ax.legend(fontsize=6)
    logit_ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.tick_params(axis="x", which="minor", labelbottom=False)
    return save_figure(fig, out_dir / "width_scaling.png")


def markdown(settings, results, found, checks, figure) -> str:
    def ci(fit):
        return f"{fit['ci95'][0]:.2f}..{fit['ci95'][1]:.2f}"

    exponent_rows = [
        [
            q,
            f["exponent"],
            ci(f),
            f["interval"],
            PAPER_EXPONENTS[q],
            "yes" if f["ci95"][0] <= PAPER_EXPONENTS[q] <= f["ci95"][1] else "no",
        ]
        for q, f in found["exponents"].items()
    ]
    scale_rows = [
        [f["arm"], f["quantity"], f["exponent"], ci(f), f["interval"]]
        for f in [*found["matrix_norms"], *found["function_scales"]]
    ]
    learned = sorted((r for r in results if r["arm"] == LRM_ARM), key=lambda r: (r["seed"], r["width"]))
    value_rows = [[r["seed"], r["width"], *(r["learned"][q] for q in PAPER_EXPONENTS)] for r in learned]
    everything = sorted(results, key=lambda r: (r["arm"], r["seed"], r["width"]))
    norm_rows = [
        [r["arm"], r["seed"], r["width"], *r["matrix_norm"].values(), *r["function"].values()] for r in everything
    ]
    return f"""
Widths {settings.widths}, {settings.layers} layers, heads of {settings.head_dim}, `{" ".join(settings.multipliers)}`
from 1 (seeds {settings.seeds}) and a control without multipliers (`lrm=none`, seeds {settings.control_seeds}); frozen
norm weights, every fixed forward multiplier 1, the same lr and wd at every width; trainer overrides
{settings.trainer}.

## Fitted exponents of the learned multipliers (value ∝ width^p, 95% CI)

Each seed's log-log fit over the widths; the seeds' mean slope with its t-interval over the seeds (one seed: the
fit's own interval).

{markdown_table(["quantity", "p (ours)", "95% CI", "interval", "p (paper)", "paper's p inside our CI"], exponent_rows)}

![width scaling]({figure})

## Matrix norms and function-level scales against width

Final RMS of each matrix class (geometric mean over its matrices; the paper: flat in width at equilibrium) and the
probe batch's logit and dt pre-activation RMS after the last step (the paper: flat with the multipliers, growing
about as d without them). Attention logits are not measured. AdamW's noise/WD equilibrium at the base lr and wd,
sqrt(lr / (2 wd)) = {found["abm_rms"]:.3g}, for comparison with the matrices' RMS.

{markdown_table(["arm", "quantity", "slope vs width", "95% CI", "interval"], scale_rows)}

## Pre-flight

Per run, each matrix group's equilibration count wd·Σlr (needed: 1) and the multipliers' travel budget Σlr against
the change 1 - d_min/d that a d^-1 scaling needs from 1 (see `preflight.py`).

{markdown_table(HEADER, [b.row() for b in checks])}

## Learned values

{markdown_table(["seed", "width", *PAPER_EXPONENTS], value_rows)}

## Matrix norms and function-level scales per run

{markdown_table(["arm", "seed", "width", *(f"RMS {c}" for c in MATRIX_CLASSES), *FUNCTION_SCALES], norm_rows)}
"""


WIDTH_SCALING = Experiment("width_scaling", WidthScalingSettings, plan, report, __doc__)
run, main = WIDTH_SCALING.run, WIDTH_SCALING.main


if __name__ == "__main__":
    sys.exit(main())
