"""Results of finished runs: their metrics, statistics over seeds, and the comparison's LR table and paired gaps.

Every report reads runs through here (``read_metrics``), so a metrics.jsonl is parsed in one place; its key prefixes
come from ``train.metrics``.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from lrm_train.experiments.analysis import mean_interval, t95
from lrm_train.experiments.runner import DIVERGED, FINISHED, RunSpec, run_status
from lrm_train.train.callbacks.sinks import METRICS_FILE


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, one per logged step, in step order (a later record of a step wins)."""
    by_step: dict[int, dict] = {}
    with open(Path(run_dir) / METRICS_FILE) as f:
        for line in f:
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def last_logged(run_dir: Path) -> dict:
    """Every metric's last logged value in the run (a metric is not logged at every step: validation, norms)."""
    last = {}
    for record in read_metrics(run_dir):
        last.update({k: v for k, v in record.items() if v is not None})
    return last


def series(records: list[dict], key: str) -> tuple[list[int], list[float | None]]:
    """(steps, values) of the records that carry ``key`` (None where it was non-finite)."""
    found = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in found], [v for _, v in found]


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None with one value: the spread is unknown, not zero)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


@dataclass
class RunResult:
    run: RunSpec
    status: str
    final: float | None  # mean validation loss of the last ``final_evals`` evaluations; None if the run diverged
    tokens: list[int]  # at each validation
    val: list[float | None]
    records: list[dict]

    @property
    def label(self) -> tuple[str, str]:
        return self.run.labels["arm"], self.run.labels["optimizer"]


def collect(runs: list[RunSpec], final_evals: int = 1) -> list[RunResult]:
    """The finished and diverged runs among ``runs`` (not those waiting for others), each with its final loss: the
    mean of its last ``final_evals`` validation losses (averaging a few cuts the noise of any one evaluation)."""
    results = []
    for run in runs:
        status = run_status(run)
        if run.waiting_for or status not in (FINISHED, DIVERGED):
            continue
        records = read_metrics(run.run_dir)
        with_val = [r for r in records if "val_loss" in r]
        last = [r["val_loss"] for r in with_val[-final_evals:]]
        final = statistics.fmean(last) if status == FINISHED and last and all(finite(v) for v in last) else None
        tokens = [r["tokens_seen"] for r in with_val]
        results.append(RunResult(run, status, final, tokens, [r["val_loss"] for r in with_val], records))
    return results


def lr_table(results: list[RunResult]) -> dict:
    """(arm, optimizer) -> lr -> {seed: result}."""
    table: dict = {}
    for r in results:
        table.setdefault(r.label, {}).setdefault(r.run.labels["lr"], {})[r.run.labels["seed"]] = r
    return table


def best_lrs(table: dict) -> dict:
    """(arm, optimizer) -> the LR with the lowest mean final loss over its finished seeds (diverged LRs excluded)."""
    best = {}
    for label, by_lr in table.items():
        means = {
            lr: mean_std([r.final for r in seeds.values()])[0]
            for lr, seeds in by_lr.items()
            if all(finite(r.final) for r in seeds.values())
        }
        if means:
            best[label] = min(means, key=means.get)
    return best


def gap_curve(arm_runs: dict, base_runs: dict) -> dict | None:
    """The loss gap arm - baseline at each common validation step, paired by seed: each seed's gaps, their mean and
    std, and the mean's 95% interval over the seeds (None with one seed)."""
    seeds = sorted(set(arm_runs) & set(base_runs))
    if not seeds:
        return None
    per_seed = []
    for seed in seeds:
        a, b = arm_runs[seed], base_runs[seed]
        base_by_tokens = dict(zip(b.tokens, b.val))
        per_seed.append(
            {t: v - base_by_tokens[t] for t, v in zip(a.tokens, a.val) if finite(v) and t in base_by_tokens}
        )
    tokens = sorted(set.intersection(*(set(p) for p in per_seed)))
    stats = [mean_std([p[t] for p in per_seed]) for t in tokens]
    intervals = [mean_interval([p[t] for p in per_seed])[1] if len(seeds) > 1 else None for t in tokens]
    return dict(
        seeds=seeds,
        tokens=tokens,
        mean=[m for m, _ in stats],
        std=[s for _, s in stats],
        ci95=intervals,
        per_seed=[[p[t] for t in tokens] for p in per_seed],
    )


# The verdicts of a paired gap (arm - baseline) from its 95% interval over the held-out seeds.
ARM_BETTER, UNRESOLVED, BASELINE_BETTER = "LRM better", "no difference resolved", "baseline better"


def paired_gap(arm_finals: dict[int, float], base_finals: dict[int, float]) -> dict | None:
    """The final-loss gap arm - baseline paired by seed (the same seed: the same initialization and data order, so
    the seed's own luck cancels): each seed's gap, their mean, its 95% t-interval over the seeds and the verdict -
    the interval entirely below 0 (the arm is better), straddling it, or entirely above it. None without a seed that
    both finished; one seed has a gap but no interval and no verdict."""
    seeds = sorted(s for s in set(arm_finals) & set(base_finals) if finite(arm_finals[s]) and finite(base_finals[s]))
    if not seeds:
        return None
    gaps = [arm_finals[s] - base_finals[s] for s in seeds]
    if len(gaps) == 1:
        return dict(seeds=seeds, per_seed=gaps, mean=gaps[0], ci95=None, verdict=None)
    mean, (low, high) = mean_interval(gaps)
    verdict = ARM_BETTER if high < 0 else BASELINE_BETTER if low > 0 else UNRESOLVED
    return dict(seeds=seeds, per_seed=gaps, mean=mean, ci95=[low, high], verdict=verdict)


GROWING, FLAT, SHRINKING, CROSSING = "growing", "flat", "shrinking", "crossing"


def gap_trend(curve: dict, first_tokens: float, end_tokens: float) -> dict | None:
    """The linear trend of the gap over ``first_tokens <= tokens < end_tokens`` (the constant-LR phase): each seed's
    least-squares slope, their mean with its 95% interval over the seeds (the seeds are the replicates; with one
    seed, the fit's own interval from its residuals), and whether the gap's size is ``growing`` (the slope, interval
    and all, has the sign of the phase's mean gap: the leader pulls away), ``shrinking`` (the opposite sign),
    ``crossing`` (the fitted line changes sign inside the phase: the leader changes, which a sign of the mean gap
    would misread as the old leader's lead shrinking) or ``flat`` (the interval holds 0). None with fewer than 3
    evaluations in the phase."""
    inside = [i for i, t in enumerate(curve["tokens"]) if first_tokens <= t < end_tokens]
    if len(inside) < 3:
        return None
    x = [curve["tokens"][i] for i in inside]
    fits = [_line_fit(x, [gaps[i] for i in inside]) for gaps in curve["per_seed"]]
    if len(fits) == 1:
        slope, ci95, intercept = fits[0]["slope"], fits[0]["ci95"], fits[0]["intercept"]
    else:
        slope, ci95 = mean_interval([f["slope"] for f in fits])
        intercept = statistics.fmean(f["intercept"] for f in fits)
    level = statistics.fmean(curve["mean"][i] for i in inside)
    at_start, at_end = intercept + slope * x[0], intercept + slope * x[-1]
    if ci95[0] <= 0 <= ci95[1]:
        trend = FLAT
    elif at_start * at_end < 0:
        trend = CROSSING
    else:
        trend = GROWING if (slope < 0) == (level < 0) else SHRINKING
    return dict(
        first_tokens=x[0],
        last_tokens=x[-1],
        points=len(x),
        slope=slope,  # loss per token
        ci95=list(ci95),
        intercept=intercept,
        per_seed=[f["slope"] for f in fits],
        mean_gap=level,
        trend=trend,
    )


def _line_fit(x: list[float], y: list[float]) -> dict:
    """Least squares ``y = intercept + slope * x``, with the slope's 95% interval from the residuals."""
    n = len(x)
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
    intercept = my - slope * mx
    residual = sum((b - intercept - slope * a) ** 2 for a, b in zip(x, y))
    half = t95(n - 2) * math.sqrt(residual / (n - 2) / sxx)
    return dict(slope=slope, intercept=intercept, ci95=[slope - half, slope + half])


def tokens_at_step(records: list[dict], step: int) -> float | None:
    """Tokens seen after ``step`` steps, interpolated between the logged records around it (exact without a batch
    ramp); None past the last record."""
    logged = [(r["step"], r["tokens_seen"]) for r in records if "tokens_seen" in r]
    before = [(s, t) for s, t in logged if s <= step] or [(0, 0)]
    after = [(s, t) for s, t in logged if s >= step]
    if not after:
        return None
    (s0, t0), (s1, t1) = before[-1], after[0]
    return t0 if s1 == s0 else t0 + (t1 - t0) * (step - s0) / (s1 - s0)
