"""``python -m lrm_train.hf import HF_DIR OUT_DIR [--placement ...]`` and ``... export SOURCE OUT_DIR``.

SOURCE is an lrm_train model folder or a training checkpoint (``runs/<name>/checkpoints/step_*``). OUT_DIR may be
missing or an empty folder, never inside a training checkpoint or a run's ``checkpoints/`` folder; ``--overwrite``
replaces only a folder lrm_train wrote, never the source. An export carries the tokenizer (``AutoTokenizer`` loads it):
the copy a checkpoint carries, or ``--tokenizer tokenizer.json`` (for a checkpoint it must be that same file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lrm_train.hf.artifact import ArtifactKind, open_artifact
from lrm_train.hf.convert import export_hf, import_hf
from lrm_train.hf.outputs import check_outside_checkpoints
from lrm_train.hf.tokenizer import tokenizer_argument
from lrm_train.models.io import check_output_folder, save_model
from lrm_train.nn import INITS, PLACEMENTS, LRMConfig
from lrm_train.utils import stderr_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrm_train.hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="Hugging Face folder -> lrm_train model folder")
    imp.add_argument("hf_dir")
    imp.add_argument("out_dir")
    imp.add_argument("--placement", choices=PLACEMENTS, default="full")
    imp.add_argument("--init", choices=INITS, default="one")
    imp.add_argument("--lm-head-rows", action="store_true")
    exp = commands.add_parser("export", help="model folder or checkpoint -> Hugging Face folder, multipliers folded")
    exp.add_argument("source")
    exp.add_argument("out_dir")
    exp.add_argument("--tokenizer", help="tokenizer.json to carry (default: the one a checkpoint carries)")
    for command in (imp, exp):
        command.add_argument(
            "--overwrite", action="store_true", help="replace out_dir if lrm_train wrote it (a model folder or export)"
        )
    args = parser.parse_args(argv)
    source = Path(args.hf_dir if args.command == "import" else args.source)
    try:
        # Before any loading.
        check_outside_checkpoints(args.out_dir, f"OUT_DIR {args.out_dir}")
        check_output_folder(args.out_dir, args.overwrite, sources=[source])
        if args.command == "import":
            lrm = LRMConfig(placement=args.placement, init=args.init, lm_head_rows=args.lm_head_rows)
            save_model(import_hf(source, lrm), args.out_dir, args.overwrite, sources=[source])
        else:
            tokenizer = tokenizer_argument(args.tokenizer, "--tokenizer") if args.tokenizer else None
            artifact = open_artifact(source, tokenizer, need_tokenizer=False)
            if artifact.kind is ArtifactKind.HF:
                raise ValueError(f"{source}: already a Hugging Face folder (export reads a checkpoint or model folder)")
            export_hf(artifact.model, args.out_dir, args.overwrite, sources=[source], tokenizer=artifact.tokenizer)
    except (ValueError, OSError) as e:
        stderr_line(f"error: {e}")
        return 2
    print(f"wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
