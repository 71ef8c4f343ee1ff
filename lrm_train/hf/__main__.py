"""``python -m lrm_train.hf import HF_DIR OUT_DIR [key=value ...]`` and ``... export SOURCE OUT_DIR [key=value ...]``:
the commands' convention (``lrm_train.cli``); the keys and their defaults in ``HFImport`` / ``HFExport`` and
``configs/hf_import.yaml`` / ``configs/hf_export.yaml`` (``--help`` prints them)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING

from lrm_train.cli import run_command
from lrm_train.config_compose import compose_schema, help_text
from lrm_train.hf.convert import export_hf
from lrm_train.hf.outputs import check_outside_checkpoints
from lrm_train.hf.tokenizer import tokenizer_argument
from lrm_train.models.hf_folder import import_hf
from lrm_train.models.io import check_output_folder, save_model
from lrm_train.nn import LRMConfig
from lrm_train.nn.multipliers import Init, Placement
from lrm_train.train.artifact import ArtifactKind, open_artifact

USAGE = """usage: python -m lrm_train.hf import HF_DIR OUT_DIR [placement=full] [init=one] [lm_head_rows=false]
                                       [overwrite=false]
       python -m lrm_train.hf export SOURCE OUT_DIR [tokenizer=FILE] [overwrite=false]
"""


@dataclass
class HFImport:
    """A Hugging Face folder -> an lrm_train model folder, with multipliers placed as asked."""

    source: str = MISSING
    out_dir: str = MISSING
    placement: Placement = Placement.full
    init: Init = Init.one
    lm_head_rows: bool = False
    overwrite: bool = False


@dataclass
class HFExport:
    """A checkpoint, run directory or model folder -> a Hugging Face folder, the multipliers folded."""

    source: str = MISSING
    out_dir: str = MISSING
    tokenizer: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.tokenizer is not None:
            tokenizer_argument(self.tokenizer, "tokenizer")


COMMANDS = {"import": ("hf_import", HFImport), "export": ("hf_export", HFExport)}
# The spellings of the argparse days, still read: flag -> key (a flag without a value sets a boolean key).
OLD_FLAGS = {"--placement": "placement", "--init": "init", "--tokenizer": "tokenizer"}
OLD_SWITCHES = {"--overwrite": "overwrite", "--lm-head-rows": "lm_head_rows"}


def compose(argv: list[str]) -> HFImport | HFExport:
    """``import|export SOURCE OUT_DIR`` and Hydra-style overrides, as the command's dataclass."""
    if len(argv) < 3 or argv[0] not in COMMANDS or any("=" in a for a in argv[1:3]):
        raise ValueError("expected import HF_DIR OUT_DIR or export SOURCE OUT_DIR first; see --help")
    config_name, schema = COMMANDS[argv[0]]
    return compose_schema(config_name, schema, [f"source={argv[1]}", f"out_dir={argv[2]}", *argv[3:]])


def with_old_flags(argv: list[str]) -> list[str]:
    """``--placement full`` as ``placement=full``, ``--overwrite`` as ``overwrite=true``; anything else as given."""
    out, rest = [], iter(argv)
    for arg in rest:
        if arg in OLD_SWITCHES:
            out.append(f"{OLD_SWITCHES[arg]}=true")
        elif arg in OLD_FLAGS:
            out.append(f"{OLD_FLAGS[arg]}={next(rest, '')}")
        else:
            out.append(arg)
    return out


def convert(cmd: HFImport | HFExport, _flags: list[str]) -> None:
    source = Path(cmd.source)
    check_outside_checkpoints(cmd.out_dir, f"OUT_DIR {cmd.out_dir}")  # before any loading
    check_output_folder(cmd.out_dir, cmd.overwrite, sources=[source])
    if isinstance(cmd, HFImport):
        lrm = LRMConfig(placement=cmd.placement, init=cmd.init, lm_head_rows=cmd.lm_head_rows)
        save_model(import_hf(source, lrm), cmd.out_dir, cmd.overwrite, sources=[source])
    else:
        artifact = open_artifact(source, cmd.tokenizer, need_tokenizer=False)
        if artifact.kind is ArtifactKind.HF:
            raise ValueError(f"{source}: already a Hugging Face folder (export reads a checkpoint or model folder)")
        export_hf(artifact.model, cmd.out_dir, cmd.overwrite, sources=[source], tokenizer=artifact.tokenizer)
    print(f"wrote {cmd.out_dir}")


def main(argv: list[str] | None = None) -> int:
    argv = with_old_flags(list(sys.argv[1:] if argv is None else argv))
    # Each subcommand's help lists its own keys.
    usage = help_text(COMMANDS[argv[0]][0], USAGE) if argv and argv[0] in COMMANDS else USAGE
    return run_command(argv, usage, compose, convert)


if __name__ == "__main__":
    sys.exit(main())
