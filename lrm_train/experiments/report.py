"""Report helpers: reading a run's metrics, statistics over seeds, PNG figures, report.md and report.json.

Every report is a folder with ``report.md`` (what a person reads, figures linked), ``report.json`` (every number the
text shows) and PNGs. Each file is written under a temporary name and renamed, so a file that exists is complete.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from lrm_train.train.callbacks.sinks import METRICS_FILE
from lrm_train.utils import atomic_write_text


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


def new_figure(panels: int = 1, title: str = ""):
    """A row of ``panels`` axes (a list even for one)."""
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    if title:
        fig.suptitle(title)
    return fig, list(axes[0])


def save_figure(fig, path: Path) -> str:
    """Write a PNG through a temporary name, close the figure and return the file name (for report.md links)."""
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path.name


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out_dir: Path, title: str, markdown: str, data: dict) -> Path:
    """report.json (every number shown, strict JSON) and report.md; returns the report.md path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.json", json.dumps(data, indent=1, allow_nan=False))
    atomic_write_text(out_dir / "report.md", f"# {title}\n\n{markdown.strip()}\n")
    return out_dir / "report.md"
