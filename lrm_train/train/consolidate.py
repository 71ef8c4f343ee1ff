"""``python -m lrm_train.train.consolidate CHECKPOINT OUT_DIR [overwrite=false]``: a sharded checkpoint as one set of
full-state files (format ``lrm_train.checkpoint/2``: ``model.safetensors`` holds the whole model, ``tensors.safetensors``
the whole optimizer state), for tools that want one file per kind. Training resumes from either form.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING

from lrm_train.cli import run_command
from lrm_train.config_compose import compose_schema, help_text
from lrm_train.train.checkpoint import FULL_FORMAT, MANIFEST, TOKENIZER, load_resumable, save_checkpoint
from lrm_train.utils import check_replaceable

USAGE = "usage: python -m lrm_train.train.consolidate CHECKPOINT OUT_DIR [overwrite=false]\n"


@dataclass
class Consolidate:
    source: str = MISSING
    out_dir: str = MISSING
    overwrite: bool = False


def compose(argv: list[str]) -> Consolidate:
    if len(argv) < 2 or any("=" in a for a in argv[:2]):
        raise ValueError("expected CHECKPOINT OUT_DIR first; see --help")
    return compose_schema("consolidate", Consolidate, [f"source={argv[0]}", f"out_dir={argv[1]}", *argv[2:]])


def consolidate(cmd: Consolidate, _flags: list[str]) -> None:
    source = Path(cmd.source)
    if not source.is_dir():
        raise ValueError(f"CHECKPOINT {source}: no such checkpoint folder")
    check_replaceable(cmd.out_dir, cmd.overwrite, _not_a_checkpoint, sources=[source])
    model_state, state = load_resumable(source)
    state["format"] = FULL_FORMAT
    save_checkpoint(Path(cmd.out_dir), model_state, state, state["trainer"]["step"], source / TOKENIZER)
    print(f"wrote {cmd.out_dir}")


def _not_a_checkpoint(folder: Path) -> str | None:
    return None if (folder / MANIFEST).is_file() else f"it has no {MANIFEST}"


def main(argv: list[str] | None = None) -> int:
    return run_command(argv, help_text("consolidate", USAGE), compose, consolidate)


if __name__ == "__main__":
    sys.exit(main())
