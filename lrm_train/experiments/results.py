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
    final: float | None  # validation loss at the final step; None if the run diverged
    tokens: list[int]  # at each validation
    val: list[float | None]
    records: list[dict]

    @property
    def label(self) -> tuple[str, str]:
        return self.run.labels["arm"], self.run.labels["optimizer"]


def collect(runs: list[RunSpec]) -> list[RunResult]:
    results = []
    for run in runs:
        status = run_status(run)
        if status not in (FINISHED, DIVERGED):
            continue
        records = read_metrics(run.run_dir)
        with_val = [r for r in records if "val_loss" in r]
        final = with_val[-1]["val_loss"] if status == FINISHED and with_val else None
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
    """The loss gap arm - baseline at each common validation step, paired by seed: mean and std over seeds."""
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
    return dict(seeds=seeds, tokens=tokens, mean=[m for m, _ in stats], std=[s for _, s in stats])


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


def at_or_before(curve: dict, tokens: float) -> float | None:
    earlier = [m for t, m in zip(curve["tokens"], curve["mean"]) if t <= tokens]
    return earlier[-1] if earlier else None
