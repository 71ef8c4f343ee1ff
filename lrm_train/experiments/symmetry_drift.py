"""The paper's symmetry drift (§4.1, Fig. 4): without weight decay on the multipliers, what pins their symmetries?

    python -m lrm_train.experiments.symmetry_drift [experiment=symmetry_drift_gpu] [key=value ...]

``W_eff = r[:, None] * W * c[None, :]`` is unchanged by ``(r, c) -> (t r, c / t)`` and by ``(r, W) -> (t r, W / t)``,
and attention by scaling a head's q-row multipliers up and its k-row ones down. The loss cannot see those directions,
so nothing but weight decay holds them: the paper saw the ratios drift, then huge activations and NaN in bf16, and
fixed it with a multiplier weight decay ``lambda_lrm = 2e-3`` (``optim.multiplier_weight_decay``).

Runs: every ``multiplier_weight_decays`` x ``precisions`` (``train.precision``: bf16 is autocast, on CPU too) x
``seeds``, with ``lrm=full``. From each run's logged trajectories (``lrm/<matrix>.lrm_{row,col}/{mean,std}`` give
each multiplier's RMS, ``norm/<matrix>`` the matrix's) the report follows, per matrix with row and column
multipliers, the change since the first logged step of
- ``row/col``: log RMS(r) - log RMS(c), a pure symmetry direction, held only by the multipliers' decay;
- ``mult/matrix``: log (RMS(r) RMS(c)) - log RMS(W), held by the multipliers' and the matrix's decay; it also moves
  as the matrix learns (a zero-initialized readout grows by orders of magnitude), so the report takes its median over
  matrices, an upper bound of the typical drift;
and, from the final checkpoint, per attention head, |log RMS(q rows) - log RMS(k rows)| (0 at ``lrm.init=one``). It
counts non-finite (skipped) steps and diverged runs, and prints how many equilibration times of the multipliers'
decay each run reaches (``wd * sum of the multipliers' LR over the steps``): below 1 the decay has not yet acted.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lrm_train.experiments.analysis import final_weights
from lrm_train.experiments.experiment import Experiment, ExperimentSettings
from lrm_train.experiments.report import markdown_table, new_figure, save_figure, write_report
from lrm_train.experiments.results import read_metrics
from lrm_train.experiments.runner import DIVERGED, FINISHED, RunSpec, create_out_dir, make_run, run_status
from lrm_train.optim import equilibration_times as optim_equilibration_times
from lrm_train.train.metrics import MULTIPLIER_KEY, NORM_KEY

PRECISIONS = ("float32", "bf16")
ARM_HEADER = ["arm", "row/col final", "row/col max", "mult/matrix final", "q/k", "NaN steps", "diverged"]
ARM_HEADER += ["final val loss", "equilibration times"]


@dataclass
class SymmetryDriftSettings(ExperimentSettings):
    out_dir: str = "experiments/symmetry_drift"
    multiplier_weight_decays: list[float] = field(default_factory=lambda: [0.0, 2e-3])
    precisions: list[str] = field(default_factory=lambda: list(PRECISIONS))
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    trainer: list[str] = field(default_factory=list)  # the model, data, LR, length and log cadence of every run

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.multiplier_weight_decays or any(wd < 0 for wd in self.multiplier_weight_decays):
            raise ValueError(f"multiplier_weight_decays={self.multiplier_weight_decays}: one or more values >= 0")
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if not self.precisions or unknown:
            raise ValueError(f"precisions={self.precisions}: each one of {', '.join(PRECISIONS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} must be distinct and name at least one")


def arm_name(wd: float, precision: str) -> str:
    return f"wd{wd:g}_{precision}"


def plan(settings: SymmetryDriftSettings) -> list[RunSpec]:
    runs = []
    for wd in settings.multiplier_weight_decays:
        for precision in settings.precisions:
            for seed in settings.seeds:
                name = f"{arm_name(wd, precision)}_s{seed}"
                overrides = [
                    "lrm=full",
                    *settings.trainer,
                    f"optim.multiplier_weight_decay={wd}",
                    f"train.precision={precision}",
                    "logging.trajectories=true",  # the drift is read from them
                ]
                run = make_run(f"symmetry_{name}", Path(settings.out_dir) / "runs" / name, overrides, seed=seed)
                if run.cfg.lrm.placement != "full":
                    raise ValueError(f"trainer: lrm.placement={run.cfg.lrm.placement}: the drift needs lrm=full")
                run.labels.update(wd=wd, precision=precision)
                runs.append(run)
    return runs


def equilibration_times(run: RunSpec) -> float:
    """How many times 1/(lr wd) of the multipliers' decay the run lasts: ``wd * sum over steps of their LR``."""
    cfg, o = run.cfg, run.cfg.optim
    lr = o.lr * o.multiplier.lr_mult
    return optim_equilibration_times(
        cfg.schedule, cfg.train.max_steps, cfg.train.grad_accum, lr, o.multiplier_weight_decay
    )


def _rms(record: dict, key: str) -> float:
    mean, std = record[f"{key}/mean"], record[f"{key}/std"]
    return math.sqrt(mean**2 + std**2)  # the logged std has no Bessel correction: mean^2 + std^2 is the mean square


def symmetry_coordinates(record: dict) -> dict[str, tuple[float, float]]:
    """Per matrix with row and column multipliers: (row/col, mult/matrix) log ratios at one logged step (a matrix
    that is still zero has none)."""
    out = {}
    suffix = ".lrm_row/mean"
    for key in record:
        if not (key.startswith(MULTIPLIER_KEY) and key.endswith(suffix)):
            continue
        matrix = key[len(MULTIPLIER_KEY) : -len(suffix)]
        if f"{MULTIPLIER_KEY}{matrix}.lrm_col/mean" not in record:
            continue
        row = _rms(record, f"{MULTIPLIER_KEY}{matrix}.lrm_row")
        col = _rms(record, f"{MULTIPLIER_KEY}{matrix}.lrm_col")
        weight = record[f"{NORM_KEY}{matrix}"]
        if min(row, col, weight) > 0:  # not a zero-initialized readout before its first update
            out[matrix] = (math.log(row) - math.log(col), math.log(row * col) - math.log(weight))
    return out


def drift_series(records: list[dict]) -> dict:
    """At each logged step, the change since the first logged step: row/col's largest over matrices, mult/matrix's
    median (see the module docstring)."""
    logged = [(r["step"], symmetry_coordinates(r)) for r in records]
    logged = [(s, c) for s, c in logged if c and all(math.isfinite(v) for pair in c.values() for v in pair)]
    _, first = logged[0]
    steps, row_col, mult_matrix = [], [], []
    for step, coords in logged:
        matrices = [m for m in coords if m in first]
        steps.append(step)
        row_col.append(max(abs(coords[m][0] - first[m][0]) for m in matrices))
        mult_matrix.append(statistics.median(abs(coords[m][1] - first[m][1]) for m in matrices))
    return dict(steps=steps, row_col=row_col, mult_matrix=mult_matrix)


def qk_imbalance(weights: dict[str, torch.Tensor], head_dim: int, heads_per_kv: int) -> float:
    """The largest |log RMS(q rows) - log RMS(k rows)| over attention heads (a query head against its k head)."""
    worst = 0.0
    layers = sorted({int(k.split(".")[1]) for k in weights if k.startswith("layers.")})
    for i in layers:
        q = weights[f"layers.{i}.self_attn.q_proj.lrm_row"].float().view(-1, head_dim)
        k = weights[f"layers.{i}.self_attn.k_proj.lrm_row"].float().view(-1, head_dim)
        k = k.repeat_interleave(heads_per_kv, dim=0)
        ratio = q.pow(2).mean(dim=1).sqrt().log() - k.pow(2).mean(dim=1).sqrt().log()
        worst = max(worst, float(ratio.abs().max()))
    return worst


def run_values(run: RunSpec) -> dict:
    status = run_status(run)
    if status not in (FINISHED, DIVERGED):
        raise ValueError(f"run {run.name} is {status}: the report needs every run ended ({run.run_dir})")
    records = read_metrics(run.run_dir)
    drift = drift_series(records)
    model = run.cfg.model
    with_val = [r["val_loss"] for r in records if "val_loss" in r]
    return dict(
        drift=drift,
        row_col_final=drift["row_col"][-1],
        row_col_max=max(drift["row_col"]),
        mult_matrix_final=drift["mult_matrix"][-1],
        qk=qk_imbalance(
            final_weights(run.run_dir),
            model.attention_head_dim,
            model.num_attention_heads // model.num_key_value_heads,
        )
        if status == FINISHED
        else None,
        skipped_steps=records[-1].get("skipped_steps", 0),
        diverged=status == DIVERGED,
        final_val_loss=with_val[-1] if status == FINISHED and with_val else None,
        equilibration_times=equilibration_times(run),
    )


def report(settings: SymmetryDriftSettings, runs: list[RunSpec]) -> Path:
    out_dir = create_out_dir(settings.out_dir)
    values = {(r.labels["wd"], r.labels["precision"], r.labels["seed"]): run_values(r) for r in runs}
    arms = {}
    for wd in settings.multiplier_weight_decays:
        for precision in settings.precisions:
            seeds = [values[(wd, precision, s)] for s in settings.seeds]

            def mean(key: str, seeds=seeds) -> float | None:
                found = [v[key] for v in seeds if v[key] is not None]
                return statistics.fmean(found) if found else None

            arms[arm_name(wd, precision)] = dict(
                wd=wd,
                precision=precision,
                row_col_final=mean("row_col_final"),
                row_col_max=mean("row_col_max"),
                mult_matrix_final=mean("mult_matrix_final"),
                qk=mean("qk"),
                skipped_steps=sum(v["skipped_steps"] for v in seeds),
                diverged=sum(v["diverged"] for v in seeds),
                final_val_loss=mean("final_val_loss"),
                equilibration_times=seeds[0]["equilibration_times"],
            )

    fig, (rc_ax, mw_ax) = new_figure(2, "symmetry drift since the first logged step (mean over seeds)")
    for wd in settings.multiplier_weight_decays:
        for precision in settings.precisions:
            series = [values[(wd, precision, s)]["drift"] for s in settings.seeds]
            count = min(len(d["steps"]) for d in series)
            x = series[0]["steps"][:count]
            style = "-" if precision == "float32" else "--"
            label = f"wd {wd:g}, {precision}"
            for ax, key in ((rc_ax, "row_col"), (mw_ax, "mult_matrix")):
                ax.plot(x, [statistics.fmean(d[key][i] for d in series) for i in range(count)], style, label=label)
    rc_ax.set(xlabel="step", ylabel="|Δ log(RMS r / RMS c)|", title="row/col: largest over matrices")
    mw_ax.set(xlabel="step", ylabel="|Δ log(RMS r RMS c / RMS W)|", title="mult/matrix: median over matrices")
    rc_ax.legend(fontsize=7)
    figure = save_figure(fig, out_dir / "symmetry_drift.png")

    rows = [
        [
            name,
            a["row_col_final"],
            a["row_col_max"],
            a["mult_matrix_final"],
            a["qk"],
            a["skipped_steps"],
            a["diverged"],
            a["final_val_loss"],
            a["equilibration_times"],
        ]
        for name, a in arms.items()
    ]
    run_rows = [
        [arm_name(wd, p), seed, v["row_col_final"], v["mult_matrix_final"], v["qk"], v["skipped_steps"]]
        for (wd, p, seed), v in values.items()
    ]
    steps = runs[0].cfg.train.max_steps
    text = f"""
Multiplier weight decays {settings.multiplier_weight_decays} x precisions {settings.precisions} x seeds
{settings.seeds}, `lrm=full`, {steps} steps; every run: {settings.trainer}.

![symmetry drift]({figure})

## Per arm (means over seeds; NaN steps and diverged runs summed)

Drifts are changes since the first logged step of the log ratios named in the columns, row/col's the largest over
matrices, mult/matrix's the median;
q/k is the largest |log RMS(q rows) - log RMS(k rows)| over attention heads at the end. "Equilibration times" is
wd x the multipliers' summed LR: how far the decay has acted (below 1 it cannot yet pin anything).

{markdown_table(ARM_HEADER, rows)}

## Every run

{markdown_table(["arm", "seed", "row/col final", "mult/matrix final", "q/k", "NaN steps"], run_rows)}
"""
    data = dict(
        settings=dataclasses.asdict(settings),
        arms=arms,
        runs=[
            dict(wd=wd, precision=p, seed=seed, **{k: v for k, v in r.items() if k != "drift"}, **r["drift"])
            for (wd, p, seed), r in values.items()
        ],
    )
    path = write_report(out_dir, "Symmetry drift of the multipliers", text, data)
    for name, a in arms.items():
        qk = "-" if a["qk"] is None else f"{a['qk']:.3f}"
        print(
            f"symmetry_drift: {name}: row/col drift {a['row_col_final']:.3f} (max {a['row_col_max']:.3f}), q/k {qk}, "
            f"{a['skipped_steps']} NaN steps, {a['diverged']} diverged; "
            f"{a['equilibration_times']:.3g} equilibration times of the multipliers' decay"
        )
    return path


SYMMETRY_DRIFT = Experiment("symmetry_drift", SymmetryDriftSettings, plan, report, __doc__)
run, main = SYMMETRY_DRIFT.run, SYMMETRY_DRIFT.main


if __name__ == "__main__":
    sys.exit(main())
