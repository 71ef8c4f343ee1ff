"""Where an export, an import or an evaluation's results may not go: into training checkpoints.

Training owns those folders: a later save replaces a ``step_*`` folder and ``keep_last`` pruning deletes it, with
whatever else was written into it, silently. (Here, not in ``models.io``: that package sits below ``train``.)
"""

from __future__ import annotations

from pathlib import Path

from lrm_train.train.checkpoint import MANIFEST, checkpoint_root, regular_checkpoint_folders
from lrm_train.train.run_dir import LOCK_FILE


def check_outside_checkpoints(path: str | Path, what: str) -> None:
    """Refuse (one ValueError line starting with ``what``) a ``path`` inside a training checkpoint or inside a run
    directory's ``checkpoints/`` folder (the path itself included)."""
    target = Path(path).resolve()  # a symlink into a checkpoint counts as inside it
    for folder in (target, *target.parents):
        if (folder / MANIFEST).is_file():
            raise ValueError(
                f"{what}: inside the training checkpoint {folder}; keep_last pruning would delete it with the "
                "checkpoint, so write it elsewhere"
            )
        run_dir = folder.parent
        if folder == checkpoint_root(run_dir) and (
            (run_dir / LOCK_FILE).exists() or regular_checkpoint_folders(run_dir)
        ):
            raise ValueError(
                f"{what}: inside {folder}, the checkpoints folder of a training run, where training saves and "
                "prunes; write it elsewhere"
            )
