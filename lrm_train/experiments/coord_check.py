"""Coordinate check (as microsoft/mup's): is muP really active in this config?

    python -m lrm_train.experiments.coord_check [experiment=coord_check_gpu] [key=value ...] ['trainer=[optim.lr=1e-2]']

Trains a few steps at each width through the trainer, for ``lrm=none`` and ``lrm=full``, and records the RMS of the
embedding output, each layer's Mamba, attention and MLP outputs, the residual stream after each layer and the logits
on every training forward. One panel per step, log-log against width, layers averaged. Under muP these curves are
flat: a quantity whose log-log slope against width exceeds ``max_slope`` in magnitude at some step is flagged - its
scale drifts with width, so the small model's tuning does not carry to the large one.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from lrm_train.experiments.analysis import check_width_sweep, power_law_fit, width_overrides
from lrm_train.experiments.experiment import Experiment, ExperimentSettings, finished
from lrm_train.experiments.report import markdown_table, save_figure, write_report
from lrm_train.experiments.runner import RunSpec, create_out_dir, make_run
from lrm_train.train import compose
from lrm_train.train.callbacks import Callback
from lrm_train.utils import atomic_write_text

QUANTITIES = ("embedding", "mamba", "attention", "mlp", "residual", "logits")


@dataclass
class CoordCheckSettings(ExperimentSettings):
    out_dir: str = "experiments/coord_check"
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    layers: int = 2
    head_dim: int = 32
    steps: int = 4
    arms: list[str] = field(default_factory=lambda: ["none", "full"])  # lrm placements
    max_slope: float = 0.25  # |log-log slope| against width above which a quantity is flagged
    # A deliberately broken muP multiplier, for testing the check: this model field is multiplied by width / widths[0].
    break_multiplier: str | None = None
    trainer: list[str] = field(
        default_factory=lambda: [
            "data.seq_len=64",
            "train.micro_batch_size=8",
            "optim.lr=3e-3",
            "schedule=constant",
            "schedule.warmup_steps=1",
        ]
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_width_sweep(self.widths, self.layers, self.head_dim, "the slope")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if not self.arms:
            raise ValueError("arms=[] must name at least one lrm placement (e.g. none, full)")
        if self.max_slope < 0:
            raise ValueError(f"max_slope={self.max_slope} must be >= 0")


RESULT_FILE = "activation_rms.json"


class ActivationRMS(Callback):
    """Forward hooks that record each watched module's output RMS on every training forward (not evaluation);
    written to ``activation_rms.json`` in the run directory when the run ends (the trainer's callback, so the
    runs go through the experiments' runner like any other)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, list[float]]] = []

    def setup(self, trainer) -> None:
        model = trainer.components.model
        watched = {"embedding": [model.embed_tokens], "logits": [model.lm_head], "residual": list(model.layers)}
        watched["mamba"] = [layer.mamba for layer in model.layers]
        watched["attention"] = [layer.self_attn for layer in model.layers]
        watched["mlp"] = [layer.feed_forward for layer in model.layers]
        model.embed_tokens.register_forward_pre_hook(self._new_forward)
        for quantity, modules in watched.items():
            for module in modules:
                module.register_forward_hook(self._recorder(quantity))

    def _new_forward(self, module, args) -> None:
        if torch.is_grad_enabled():
            self.steps.append({q: [] for q in QUANTITIES})

    def _recorder(self, quantity: str):
        def record(module, args, output) -> None:
            if torch.is_grad_enabled():
                if quantity == "logits":  # in training the LM head returns the loss, not the logits: form them here
                    with torch.no_grad():
                        output = module(args[0])
                self.steps[-1][quantity].append(float(output.detach().float().pow(2).mean().sqrt()))

        return record

    def on_end(self, trainer) -> None:
        if trainer.engine.is_main and not trainer.failed:
            rms = [{q: sum(v) / len(v) for q, v in step.items()} for step in self.steps]
            atomic_write_text(trainer.run_dir / RESULT_FILE, json.dumps(dict(rms=rms, per_layer=self.steps)))

    def state_dict(self) -> dict:
        return {"steps": json.dumps(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        self.steps = json.loads(state["steps"])


def plan(settings: CoordCheckSettings) -> list[RunSpec]:
    """Every run composed before any trains (a bad key fails first), labelled by arm and width."""
    runs = []
    for arm in settings.arms:
        for width in settings.widths:
            overrides = [
                f"lrm={arm}",
                *width_overrides(width, settings.layers, settings.head_dim),
                f"train.max_steps={settings.steps}",
                f"train.eval_every={settings.steps}",
                f"train.ckpt_every={settings.steps}",
                "train.log_every=1",
                "logging.progress=false",
                "logging.wandb.mode=disabled",
                f"+callbacks.activation_rms._target_={ActivationRMS.__module__}.ActivationRMS",
                *settings.trainer,
            ]
            if settings.break_multiplier:
                overrides.append(_broken_override(settings, overrides, width))
            run_dir = Path(settings.out_dir) / "runs" / f"{arm}_w{width}"
            runs.append(make_run(f"coord_{arm}_w{width}", run_dir, overrides, arm=arm, width=width))
    return runs


def _broken_override(settings: CoordCheckSettings, overrides: list[str], width: int) -> str:
    name = settings.break_multiplier
    base = compose(overrides).model
    if not name.endswith("_multiplier") or not hasattr(base, name):
        raise ValueError(f"break_multiplier={name!r} is not a model multiplier field (e.g. embedding_multiplier)")
    return f"model.{name}={getattr(base, name) * width / settings.widths[0]}"


def measured(runs: list[RunSpec]) -> dict:
    """What ``ActivationRMS`` wrote in each finished run, by ``<arm>/<width>``."""
    return {f"{r.labels['arm']}/{r.labels['width']}": json.loads((r.run_dir / RESULT_FILE).read_text()) for r in runs}


def slopes(settings: CoordCheckSettings, results: dict) -> list[dict]:
    rows = []
    for arm in settings.arms:
        for step in range(settings.steps):
            for quantity in QUANTITIES:
                values = [results[f"{arm}/{w}"]["rms"][step][quantity] for w in settings.widths]
                fit = power_law_fit(settings.widths, values)
                flagged = abs(fit["exponent"]) > settings.max_slope
                rows.append(dict(arm=arm, step=step + 1, quantity=quantity, **fit, flagged=flagged))
    return rows


def plot(settings: CoordCheckSettings, results: dict, arm: str, out_dir: Path) -> str:
    fig, axes = plt.subplots(1, settings.steps, figsize=(3.2 * settings.steps, 3.4), sharey=True, squeeze=False)
    for step, ax in enumerate(axes[0]):
        for i, quantity in enumerate(QUANTITIES):
            values = [results[f"{arm}/{w}"]["rms"][step][quantity] for w in settings.widths]
            ax.loglog(settings.widths, values, "o-", color=f"C{i}", label=quantity)
        ax.set_title(f"step {step + 1}")
        ax.set_xlabel("width")
        ax.set_xticks(settings.widths, [str(w) for w in settings.widths], minor=False)
        ax.minorticks_off()
    axes[0][0].set_ylabel("RMS of the output")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"coordinate check, lrm={arm} (flat = width-independent)")
    return save_figure(fig, out_dir / f"coord_check_{arm}.png")


def report(settings: CoordCheckSettings, runs: list[RunSpec]) -> Path:
    out_dir = create_out_dir(settings.out_dir)
    results = measured(finished(runs))
    rows = slopes(settings, results)
    figures = {arm: plot(settings, results, arm, out_dir) for arm in settings.arms}
    flagged = sorted({(r["arm"], r["quantity"]) for r in rows if r["flagged"]})
    text = f"""
Widths {settings.widths}, {settings.layers} layers, heads of {settings.head_dim}; {settings.steps} training steps with
the trainer overrides {settings.trainer}{_broken(settings)}. RMS of each output on every training forward (per-layer
quantities averaged over layers). A quantity is flagged when |log-log slope against width| > {settings.max_slope}
at some step.

Flagged (arm, quantity): {", ".join(f"{a}/{q}" for a, q in flagged) or "none"}

"""
    for arm in settings.arms:
        text += f"## lrm={arm}\n\n![coordinate check]({figures[arm]})\n\n"
        table = [
            [
                r["step"],
                r["quantity"],
                r["exponent"],
                f"{r['ci95'][0]:.3f}..{r['ci95'][1]:.3f}",
                "FLAG" if r["flagged"] else "",
            ]
            for r in rows
            if r["arm"] == arm
        ]
        text += markdown_table(["step", "quantity", "slope vs width", "95% CI", ""], table) + "\n\n"
    data = dict(
        settings=dataclasses.asdict(settings),
        flagged=[f"{a}/{q}" for a, q in flagged],
        slopes=rows,
        rms={key: value["rms"] for key, value in results.items()},
    )
    path = write_report(out_dir, "Coordinate check", text, data)
    for arm, quantity in flagged:
        worst = max(
            (r for r in rows if r["arm"] == arm and r["quantity"] == quantity), key=lambda r: abs(r["exponent"])
        )
        print(
            f"coord_check: lrm={arm} {quantity} drifts with width (slope {worst['exponent']:.2f} at step "
            f"{worst['step']})"
        )
    if not flagged:
        print("coord_check: every quantity is flat in width")
    return path


def _broken(settings: CoordCheckSettings) -> str:
    if not settings.break_multiplier:
        return ""
    return f", and model.{settings.break_multiplier} deliberately scaled by width/{settings.widths[0]}"


COORD_CHECK = Experiment("coord_check", CoordCheckSettings, plan, report, __doc__)
run, main = COORD_CHECK.run, COORD_CHECK.main


if __name__ == "__main__":
    sys.exit(main())
