"""One reader for everything a training leaves behind: ``open_artifact(path)``.

``path`` is a training checkpoint (``runs/<name>/checkpoints/step_*``, any engine), a run directory (its newest
checkpoint that verifies, a newer one that does not skipped with a warning, as ``train.resume=auto`` does), an
lrm_train model folder or a Hugging Face folder. Whatever it is, it is recognised here, loaded and verified once, and
comes back as an ``Artifact``: the model, its tokenizer and, for a checkpoint, what it was trained as and on. Evaluation,
export and the experiments read models through it and nowhere else.

The tokenizer is the copy a checkpoint carries (a ``tokenizer`` given for one must be that same file), the one a model
or HF folder carries, or the ``tokenizer`` given; a checkpoint never looks for its data or tokenizer in the corpus.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

from omegaconf import OmegaConf

from lrm_train.models import FalconH1LM
from lrm_train.models.hf_folder import import_hf
from lrm_train.models.io import load_model
from lrm_train.train.checkpoint import MANIFEST, TOKENIZER, load_resumable, model_from_state, newest_loadable
from lrm_train.train.config import RunConfig
from lrm_train.utils import first_line, sha256_file


class ArtifactKind(StrEnum):
    CHECKPOINT = "checkpoint"  # a training checkpoint (also when a run directory was given)
    MODEL = "model"  # an lrm_train model folder (``hf import`` or ``models.io.save_model`` wrote it)
    HF = "hf"  # a Hugging Face folder (transformers' FalconH1, or our export)


class Artifact(NamedTuple):
    path: Path  # as given
    kind: ArtifactKind
    model: FalconH1LM
    tokenizer: Path | None  # its tokenizer.json; None only when none was required and none is known
    checkpoint: Path | None = None  # the training checkpoint read (a run directory's newest that verifies)
    run: dict | None = None  # that checkpoint's ``run`` section, as stored
    run_config: RunConfig | None = None  # the config it was trained with, checked against today's schema
    data_folder: Path | None = None  # the prepared data it was trained on, as recorded

    @property
    def run_dir(self) -> Path | None:
        return self.checkpoint.parent.parent if self.checkpoint is not None else None  # <run>/checkpoints/step_N


def open_artifact(path: str | Path, tokenizer: str | Path | None = None, need_tokenizer: bool = True) -> Artifact:
    """The artifact at ``path`` (see the module docstring). ``tokenizer``: a tokenizer.json to pair with it; with
    ``need_tokenizer`` a folder that carries none and is given none is refused (one line) before its model is built."""
    path = Path(path)
    given = Path(tokenizer) if tokenizer is not None else None
    if not path.exists():
        raise ValueError(f"{path}: no such checkpoint, run directory or model folder")
    if (path / MANIFEST).exists():
        found = (path, *load_resumable(path))
    elif (path / "config.json").exists():
        found = None
    elif not (found := newest_loadable(path)):
        raise ValueError(f"{path}: not a checkpoint, run directory, model folder or Hugging Face folder")
    if found:
        checkpoint, model_state, state = found
        run = state["run"]
        tokenizer_path = checkpoint_tokenizer(checkpoint, run, given)  # settled (or refused) before the model is built
        data = run.get("data")
        return Artifact(
            path,
            ArtifactKind.CHECKPOINT,
            model_from_state(model_state, run, checkpoint),
            tokenizer_path,
            checkpoint,
            run,
            _run_config(checkpoint, run),
            Path(data["folder"]) if data else None,
        )
    kind = ArtifactKind.HF if "model_type" in OmegaConf.load(path / "config.json") else ArtifactKind.MODEL
    tokenizer_path = given or (path / "tokenizer.json" if (path / "tokenizer.json").exists() else None)
    if tokenizer_path is None and need_tokenizer:
        raise ValueError(f"{path}: it carries no tokenizer; pass tokenizer=PATH (a tokenizer.json)")
    model = import_hf(path) if kind is ArtifactKind.HF else load_model(path)
    return Artifact(path, kind, model, tokenizer_path)


def checkpoint_tokenizer(checkpoint: Path, run: dict, given: Path | None = None) -> Path:
    """The tokenizer.json ``checkpoint`` (its ``run`` section) was trained with: the copy the checkpoint carries.

    Never looked up from the corpus: a corpus changed since, or prepared again, gives another tokenizer, and a model
    paired with it decodes wrongly. ``given`` must be the same file (its sha256 is the one the run recorded); a
    checkpoint written before checkpoints carried their tokenizer has no record, so there ``given`` is required.
    """
    recorded = (run.get("data") or {}).get("tokenizer_sha256")
    if recorded is None:
        if given is None:
            raise ValueError(
                f"checkpoint {checkpoint}: written before checkpoints carried their tokenizer; "
                "pass the tokenizer.json it was trained with"
            )
        return given
    if given is not None and sha256_file(given) != recorded:
        raise ValueError(
            f"{given} is not the tokenizer checkpoint {checkpoint} was trained with "
            f"({checkpoint / TOKENIZER}, sha256 {recorded[:12]}...); refusing to pair them"
        )
    return checkpoint / TOKENIZER


def _run_config(checkpoint: Path, run: dict) -> RunConfig:
    """The checkpoint's recorded config through today's schema, so that readers get typed values, not raw YAML."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(run["config"]))
        return OmegaConf.to_object(merged)
    except Exception as e:  # noqa: BLE001 - OmegaConf raises many types; each means the same here
        raise ValueError(f"checkpoint {checkpoint}: its recorded config does not fit this version ({first_line(e)})")
