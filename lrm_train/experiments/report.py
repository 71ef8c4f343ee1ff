"""Report helpers: PNG figures, markdown tables, report.md and report.json (a run's metrics and the statistics over
seeds are in ``results.py``).

Every report is a folder with ``report.md`` (what a person reads, figures linked), ``report.json`` (every number the
text shows) and PNGs. Each file is written under a temporary name and renamed, so a file that exists is complete.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from lrm_train.utils import atomic_write_bytes, atomic_write_text


def new_figure(panels: int = 1, title: str = ""):
    """A row of ``panels`` axes (a list even for one)."""
    # Constrained layout keeps a two-line title clear of the panels' own titles and makes room for outside legends.
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False, layout="constrained")
    if title:
        fig.suptitle(title)
    return fig, list(axes[0])


def save_figure(fig, path: Path) -> str:
    """Write a PNG atomically, close the figure and return the file name (for report.md links)."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
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
