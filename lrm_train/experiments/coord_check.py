"""Coordinate check (as microsoft/mup's): is muP really active in this config?

    python -m lrm_train.experiments.coord_check [experiment=coord_check_gpu] [key=value ...] ['trainer=[data.seq_len=64]']

Trains a few steps at each width through the trainer, for each optimizer, each LR factor (the base ``lr`` and a
multiple of it) and each LRM placement, under one ``parametrization`` (``mup_multiplier``: the through-multiplier form
of each run's optimizer). A fixed probe batch goes through the model at initialization and after every step; the
callback records the RMS of the embedding output, each layer's Mamba, attention and MLP outputs, the residual stream
after each layer and the logits, and the Mamba mixer's parts: the in_proj's sections (z, x, B, C, dt) and the scan's
gated output (layers averaged), and the RMS of each one's change since initialization, h_t - h_0:
the quantity muP keeps width-independent (h_t itself is partly its initial value for the first steps).

Each quantity's log-log slope against width is fitted at every step, per seed; the seeds' slopes are averaged, with
their 95% interval over the seeds. The check is over steps 2..T, every output and every change since initialization
(step 1 is reported, not checked: below muP's zero LM head no gradient flows at the first step). The command ends with
one line per optimizer,
``coord check (<optimizer>, <parametrization>): max |slope| X over N quantities, steps 2..T (bar B)``, and exits 1
when a slope is above the bar: the small model's tuning would not carry to the large one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from lrm_train.experiments.analysis import (
    SweepParametrization,
    check_sweep_choices,
    check_width_sweep,
    slope_over_seeds,
    width_overrides,
)
from lrm_train.experiments.experiment import Experiment, ExperimentFailed, ExperimentSettings, finished
from lrm_train.experiments.report import markdown_table, save_figure, write_report
from lrm_train.experiments.runner import RunSpec, create_out_dir, make_run
from lrm_train.models import FalconH1LM
from lrm_train.nn import fused_linear
from lrm_train.train import compose
from lrm_train.train.callbacks import Callback
from lrm_train.utils import atomic_write_text

# The Mamba mixer's inputs to its scan (the in_proj's sections) and the scan's gated output (out_proj's input) are
# watched too: the mixer multiplies five learned quantities, so its output can drift with width while each factor
# stays flat, and these show which.
# The in_proj's sections; what the scan takes (x, B, C after the conv, dt after softplus) and its scores C_t.B_s
# (s <= t: how strongly a past token is read, the attention logits' counterpart); the gated scan output.
MAMBA_PARTS = (
    *(f"mamba.{name}" for name in ("z", "x", "B", "C", "dt")),
    *(f"mamba.scan_{name}" for name in ("x", "B", "C", "dt")),
    "mamba.scores",
    "mamba.gated",
)
QUANTITIES = ("embedding", "mamba", *MAMBA_PARTS, "attention", "mlp", "residual", "logits")
KINDS = ("rms", "delta")  # the output's RMS; the RMS of its change since initialization
PROBE_SEQUENCES = 2


@dataclass
class CoordCheckSettings(ExperimentSettings):
    out_dir: str = "experiments/coord_check"
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    layers: int = 2
    head_dim: int = 32
    steps: int = 10
    optimizers: list[str] = field(default_factory=lambda: ["adamw", "muon"])
    parametrization: SweepParametrization = SweepParametrization.mup
    lr: float = 1e-3  # the base LR (optim.lr: at the base width under muP)
    lr_factors: list[float] = field(default_factory=lambda: [1.0, 4.0])
    arms: list[str] = field(default_factory=lambda: ["none", "full"])  # lrm placements
    # Each seed's slope is fitted, and the slopes averaged with an interval over them: the first steps of a hybrid's
    # Mamba output vary by 2-10x from one init to the next, at every width, so one seed's slope of the mixer's parts
    # has a standard deviation of about 0.6 (AdamW, 4x the LR). 18 seeds bring their mean's standard error down to the
    # bar; with 6, Muon's check read 0.21 on seed noise where 18 read 0.14.
    seeds: list[int] = field(default_factory=lambda: list(range(18)))
    max_slope: float = 0.15  # the bar on |log-log slope| against width, steps 2..T
    # A deliberately broken muP multiplier, for testing the check: this model field is multiplied by width / widths[0].
    break_multiplier: str | None = None
    trainer: list[str] = field(
        default_factory=lambda: [
            "data.seq_len=64",
            "train.micro_batch_size=8",
            "schedule=constant",
            "schedule.warmup_steps=1",
        ]
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_width_sweep(self.widths, self.layers, self.head_dim, "the slope")
        if self.steps < 2:
            raise ValueError(f"steps={self.steps} must be >= 2 (the check is over steps 2..steps)")
        self.parametrization = check_sweep_choices(self.parametrization, self.optimizers)
        for name in ("arms", "lr_factors", "seeds"):
            if not getattr(self, name):
                raise ValueError(f"{name}=[] must name at least one")
        if self.lr <= 0 or any(f <= 0 for f in self.lr_factors):
            raise ValueError(f"lr={self.lr} and lr_factors={self.lr_factors} must be > 0")
        if self.max_slope < 0:
            raise ValueError(f"max_slope={self.max_slope} must be >= 0")


RESULT_FILE = "activation_rms.json"


class ActivationRMS(Callback):
    """Forward hooks on the watched modules; a fixed probe batch (the first training batch's first sequences, read
    without moving the loader) goes through the model at initialization and after every step, and each watched
    output's RMS and the RMS of its change since initialization are recorded (step 0: initialization). Written to
    ``activation_rms.json`` in the run directory when the run ends."""

    name = "activation_rms"

    def __init__(self) -> None:
        self.steps: list[dict[str, dict[str, float]]] = []
        self.initial: dict[str, list[torch.Tensor]] = {}  # each watched output at initialization, for the change
        self.current: dict[str, list[torch.Tensor]] = {}
        self.recording = False

    def setup(self, trainer) -> None:
        model = trainer.components.model
        watch(model, self._record_output)
        self.probe = trainer.components.loader.batch(0)[0][:PROBE_SEQUENCES]
        self.model = model
        if not self.steps:  # a resumed run keeps the initial outputs it saved
            self.initial = self._forward()
            self._record()

    def _forward(self) -> dict[str, list[torch.Tensor]]:
        self.current = {q: [] for q in QUANTITIES}
        self.recording = True
        try:
            with torch.no_grad():
                self.model(self.probe.to(next(self.model.parameters()).device))
        finally:
            self.recording = False
        return self.current

    def _record_output(self, quantity: str, output: torch.Tensor) -> None:
        if self.recording:
            self.current[quantity].append(output.detach().float().cpu())

    def _record(self) -> None:
        outputs = self.current
        self.steps.append(
            {
                q: {
                    "rms": _mean([o.pow(2).mean().sqrt().item() for o in outputs[q]]),
                    "delta": _mean([(o - i).pow(2).mean().sqrt().item() for o, i in zip(outputs[q], self.initial[q])]),
                }
                for q in QUANTITIES
            }
        )

    def on_step(self, trainer, step) -> None:
        self._forward()
        self._record()

    def on_end(self, trainer) -> None:
        if trainer.engine.is_main and not trainer.failed:
            atomic_write_text(trainer.run_dir / RESULT_FILE, json.dumps(dict(steps=self.steps)))

    def state_dict(self) -> dict:
        return {"steps": json.dumps(self.steps), "initial": {q: torch.stack(v) for q, v in self.initial.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.steps = json.loads(state["steps"])
        self.initial = {q: list(v) for q, v in state["initial"].items()}


def watch(model: FalconH1LM, record: Callable[[str, torch.Tensor], None]) -> None:
    """Forward hooks that hand every watched output of ``model`` to ``record(quantity, output)``, per layer."""

    def output_of(quantity: str):
        return lambda module, args, output: record(quantity, output)

    watched = {"embedding": [model.embed_tokens], "logits": [model.lm_head], "residual": list(model.layers)}
    watched["mamba"] = [layer.mamba for layer in model.layers]
    watched["attention"] = [layer.self_attn for layer in model.layers]
    watched["mlp"] = [layer.feed_forward for layer in model.layers]
    for quantity, modules in watched.items():
        for module in modules:
            module.register_forward_hook(output_of(quantity))
    for layer in model.layers:
        mixer = layer.mamba
        # The in_proj runs as one fused matmul, so its sections are recomputed from the mixer's input.
        mixer.register_forward_pre_hook(lambda mixer, args: _record_sections(mixer, args[0], record))
        mixer.out_proj.register_forward_pre_hook(lambda module, args: record("mamba.gated", args[0]))


def _record_sections(mixer, h: torch.Tensor, record: Callable[[str, torch.Tensor], None]) -> None:
    sections = fused_linear(h, list(mixer.in_proj.values())).split(mixer.section_sizes, dim=-1)
    for name, section in zip(mixer.in_proj, sections):
        record(f"mamba.{name}", section)
    _, x, B, C, dt = mixer.scan_inputs(h)
    for name, value in zip(("x", "B", "C", "dt"), (x, B, C, dt)):
        record(f"mamba.scan_{name}", value)
    record("mamba.scores", scan_scores(mixer, B, C))


def scan_scores(mixer, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """C_t.B_s for every s <= t and group: the scan's counterpart of attention logits, which grows with the
    alignment of C and B, not only with their sizes."""
    by_group = (-1, (mixer.n_groups, mixer.d_state))
    scores = torch.einsum("btgn,bsgn->bgts", C.unflatten(*by_group), B.unflatten(*by_group))
    seq_len = B.shape[1]
    return scores[..., torch.ones(seq_len, seq_len, dtype=torch.bool, device=B.device).tril()]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def plan(settings: CoordCheckSettings) -> list[RunSpec]:
    """Every run composed before any trains (a bad key fails first), labelled by optimizer, LR factor, arm, width."""
    runs = []
    for optimizer in settings.optimizers:
        parametrization = settings.parametrization.for_optimizer(optimizer)
        for factor in settings.lr_factors:
            for arm in settings.arms:
                for width, seed in itertools.product(settings.widths, settings.seeds):
                    overrides = [
                        f"optim={optimizer}",
                        f"optim.lr={settings.lr * factor}",
                        f"lrm={arm}",
                        *width_overrides(width, settings.layers, settings.head_dim, parametrization),
                        f"train.max_steps={settings.steps}",
                        f"train.eval_every={settings.steps}",
                        f"train.ckpt_every={settings.steps}",
                        "train.final_checkpoint=weights",  # read, never trained on: a third of the disk
                        "train.log_every=1",
                        "logging.progress=false",
                        "logging.wandb.mode=disabled",
                        f"+callbacks.activation_rms._target_={ActivationRMS.__module__}.ActivationRMS",
                        *settings.trainer,
                    ]
                    if settings.break_multiplier:
                        overrides.append(_broken_override(settings, overrides, width))
                    label = f"{optimizer}_lr{factor:g}_{arm}_w{width}" + (f"_s{seed}" if seed else "")
                    run_dir = Path(settings.out_dir) / "runs" / label
                    labels = dict(optimizer=optimizer, lr_factor=factor, arm=arm, width=width)
                    runs.append(make_run(f"coord_{label}", run_dir, overrides, seed=seed, **labels))
    return runs


def _broken_override(settings: CoordCheckSettings, overrides: list[str], width: int) -> str:
    name = settings.break_multiplier
    base = compose(overrides).model
    if not name.endswith("_multiplier") or not hasattr(base, name):
        raise ValueError(f"break_multiplier={name!r} is not a model multiplier field (e.g. embedding_multiplier)")
    return f"model.{name}={getattr(base, name) * width / settings.widths[0]}"


def _series(optimizer: str, factor: float, arm: str) -> str:
    return f"{optimizer}/lr{factor:g}/{arm}"


def measured(runs: list[RunSpec]) -> dict:
    """What ``ActivationRMS`` wrote in the finished runs: ``<optimizer>/lr<factor>/<arm>`` -> width -> one list of
    steps per seed, in the order of the seeds."""
    results: dict = {}
    for r in sorted(runs, key=lambda r: r.labels["seed"]):
        key = _series(r.labels["optimizer"], r.labels["lr_factor"], r.labels["arm"])
        steps = json.loads((r.run_dir / RESULT_FILE).read_text())["steps"]
        results.setdefault(key, {}).setdefault(r.labels["width"], []).append(steps)
    return results


def seed_means(results: dict) -> dict:
    """``measured``'s values averaged over the seeds (what the plot shows)."""
    return {
        key: {
            width: [
                {q: {k: _mean([run[t][q][k] for run in runs]) for k in KINDS} for q in QUANTITIES}
                for t in range(len(runs[0]))
            ]
            for width, runs in widths.items()
        }
        for key, widths in results.items()
    }


def slopes(settings: CoordCheckSettings, results: dict) -> list[dict]:
    """Every (series, step, quantity, kind)'s slope against width, the mean of the seeds' slopes with its interval
    over the seeds (``slope_over_seeds``); ``checked`` says whether the bar applies. A quantity that is zero at every
    width (a zero-initialized readout's output at initialization) has no slope and no row."""
    rows = []
    for series, by_width in results.items():
        seeds = len(by_width[settings.widths[0]])
        for step in range(settings.steps + 1):
            for quantity in QUANTITIES:
                for kind in KINDS:
                    if kind == "delta" and step == 0:
                        continue  # zero by definition
                    per_seed = [[by_width[w][s][step][quantity][kind] for w in settings.widths] for s in range(seeds)]
                    if not any(v for values in per_seed for v in values):
                        continue
                    fit = slope_over_seeds(settings.widths, per_seed)
                    checked = step >= 2
                    flagged = checked and abs(fit["exponent"]) > settings.max_slope
                    # Above the bar beyond the seeds' noise: the whole 95% interval lies outside [-bar, bar].
                    confident = flagged and (
                        fit["ci95"][0] > settings.max_slope or fit["ci95"][1] < -settings.max_slope
                    )
                    rows.append(dict(series=series, step=step, quantity=quantity, kind=kind, **fit, checked=checked,
                                     flagged=flagged, confident=confident))  # fmt: skip
    return rows


def verdicts(settings: CoordCheckSettings, rows: list[dict]) -> list[tuple[str, bool]]:
    """One line per optimizer (see the module docstring) and whether it passes."""
    lines = []
    for optimizer in settings.optimizers:
        mine = [r for r in rows if r["checked"] and r["series"].startswith(f"{optimizer}/")]
        worst = max(mine, key=lambda r: abs(r["exponent"]))
        above = [r for r in mine if r["flagged"]]
        line = (
            f"coord check ({optimizer}, {settings.parametrization.for_optimizer(optimizer)}): max |slope| "
            f"{abs(worst['exponent']):.3f} over {len(mine)} quantities, steps 2..{settings.steps} "
            f"(bar {settings.max_slope:g}); worst {worst['series']} {worst['quantity']} {worst['kind']} at step "
            f"{worst['step']} (95% CI over seeds {worst['ci95'][0]:.2f}..{worst['ci95'][1]:.2f}); {len(above)} above "
            f"the bar, {sum(r['confident'] for r in above)} of them beyond it with 95% confidence"
        )
        lines.append((line, abs(worst["exponent"]) <= settings.max_slope))
    return lines


# What each figure shows: the blocks and the stream, and the Mamba mixer's parts next to its output.
FIGURES = {"": [q for q in QUANTITIES if q not in MAMBA_PARTS], "_mamba": ["mamba", *MAMBA_PARTS]}


def plot(settings: CoordCheckSettings, results: dict, optimizer: str, out_dir: Path, figure: str = "") -> str:
    """Rows: LR factor x arm; columns: steps 0 (init), 1, 2, the middle and the last; solid: RMS, dashed: change."""
    series = [key for key in results if key.startswith(f"{optimizer}/")]
    shown = sorted({0, 1, 2, settings.steps // 2, settings.steps})
    fig, axes = plt.subplots(len(series), len(shown), figsize=(3 * len(shown), 2.8 * len(series)), squeeze=False)
    for row, key in enumerate(series):
        for col, step in enumerate(shown):
            ax = axes[row][col]
            for i, quantity in enumerate(FIGURES[figure]):
                for kind, style in (("rms", "o-"), ("delta", "x--")):
                    if kind == "delta" and step == 0:
                        continue
                    values = [results[key][w][step][quantity][kind] for w in settings.widths]
                    if not any(values):
                        continue  # a zero-initialized readout at initialization: nothing on a log scale
                    label = f"{quantity} {kind}" if row == 0 and col == len(shown) - 1 else None
                    ax.loglog(settings.widths, values, style, color=f"C{i}", label=label, ms=3)
            ax.set_title(f"{key}, step {step}", fontsize=8)
            ax.set_xticks(settings.widths, [str(w) for w in settings.widths], minor=False)
            ax.minorticks_off()
    axes[0][-1].legend(fontsize=6)
    parts = " (the Mamba mixer's parts)" if figure else ""
    fig.suptitle(
        f"coordinate check{parts}, {optimizer}, {settings.parametrization.for_optimizer(optimizer)} "
        "(flat = width-independent)"
    )
    return save_figure(fig, out_dir / f"coord_check_{optimizer}{figure}.png")


def report(settings: CoordCheckSettings, runs: list[RunSpec]) -> Path:
    out_dir = create_out_dir(settings.out_dir)
    per_seed = measured(finished(runs))
    rows = slopes(settings, per_seed)
    results = seed_means(per_seed)
    figures = {
        optimizer: [plot(settings, results, optimizer, out_dir, figure) for figure in FIGURES]
        for optimizer in settings.optimizers
    }
    lines = verdicts(settings, rows)
    flagged = sorted({(r["series"], r["quantity"], r["kind"]) for r in rows if r["flagged"]})
    text = f"""
Widths {settings.widths}, {settings.layers} layers, heads of {settings.head_dim}; parametrization
{settings.parametrization}; seeds {settings.seeds}; {settings.steps} training steps at lr {settings.lr:g} x {settings.lr_factors} with the
trainer overrides {settings.trainer}{_broken(settings)}. A probe batch's outputs at initialization (step 0) and after
each step: their RMS (rms) and the RMS of their change since initialization (delta), per-layer quantities averaged
over layers. Each slope against width is the mean of the seeds' own log-log slopes, with its 95% interval over the
seeds (the plots show the seeds' mean values). Checked: steps 2..{settings.steps}, every quantity;
bar |slope| <= {settings.max_slope}; a slope above it is marked FLAG when its whole interval lies beyond the bar, and
"FLAG (within noise)" when the interval reaches back inside it.

{chr(10).join(f"- {line}" for line, _ in lines)}

Flagged (series, quantity, kind): {", ".join("/".join(f) for f in flagged) or "none"}

"""
    for optimizer in settings.optimizers:
        text += f"## {optimizer}\n\n" + "".join(f"![coordinate check]({f})\n\n" for f in figures[optimizer])
        worst = {}
        for r in rows:
            if r["series"].startswith(f"{optimizer}/") and r["step"] >= 1:
                key = (r["series"], r["quantity"], r["kind"])
                if key not in worst or abs(r["exponent"]) > abs(worst[key]["exponent"]):
                    worst[key] = r
        table = [
            [*key, r["step"], r["exponent"], f"{r['ci95'][0]:.3f}..{r['ci95'][1]:.3f}",
             _mark(r)]
            for key, r in worst.items()
        ]  # fmt: skip
        text += (
            "The largest |slope| of each series and quantity over steps 1..T:\n\n"
            + markdown_table(["series", "quantity", "kind", "step", "slope vs width", "95% CI over seeds", ""], table)
            + "\n\n"
        )
    data = dict(
        settings=dataclasses.asdict(settings),
        verdicts=[dict(line=line, passed=ok) for line, ok in lines],
        flagged=["/".join(f) for f in flagged],
        slopes=rows,
        measured={key: {str(w): steps for w, steps in by_width.items()} for key, by_width in results.items()},
    )
    path = write_report(out_dir, "Coordinate check", text, data)
    for line, _ in lines:
        print(line)
    if not all(ok for _, ok in lines):
        raise ExperimentFailed(f"coordinate check above the bar {settings.max_slope} (see {path})")
    return path


def _mark(row: dict) -> str:
    if not row["checked"]:
        return "not checked"
    if row["flagged"]:
        return "FLAG" if row["confident"] else "FLAG (within noise)"
    return ""


def _broken(settings: CoordCheckSettings) -> str:
    if not settings.break_multiplier:
        return ""
    return f", and model.{settings.break_multiplier} deliberately scaled by width/{settings.widths[0]}"


COORD_CHECK = Experiment("coord_check", CoordCheckSettings, plan, report, __doc__)
run, main = COORD_CHECK.run, COORD_CHECK.main


if __name__ == "__main__":
    sys.exit(main())
