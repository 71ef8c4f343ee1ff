"""``train.init_from``: a run starts from another model's weights (any kind of folder, any LRM placement) with a fresh
optimizer, and its first loss is the source model's loss on the same batch."""

import json

import pytest
import torch
from runs import run_config

import lrm_train.train.build as build_module
from lrm_train.data import BatchLoader, TokenData
from lrm_train.hf import export_hf
from lrm_train.models.io import save_model
from lrm_train.train import train
from lrm_train.train.artifact import open_artifact

Z_LOSS = 1e-4


@pytest.fixture(scope="module")
def source(data_root, tmp_path_factory):
    """A run trained for a few steps (its multipliers have moved from 1), and its model as the other kinds of folder."""
    root = tmp_path_factory.mktemp("init_from")
    train(run_config(data_root, root / "run", **{"train.max_steps": 6, "train.ckpt_every": 6}))
    artifact = open_artifact(root / "run")
    save_model(artifact.model, root / "model")
    export_hf(artifact.model, root / "hf", tokenizer=artifact.tokenizer)
    return root, artifact


def first_losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def loss_on_first_batch(artifact, seq_len=32, batch=4) -> float:
    loader = BatchLoader(TokenData(artifact.data_folder).splits["train"], seq_len, batch, seed=0)
    x, y = next(loader)
    with torch.no_grad():
        return artifact.model(x, y, Z_LOSS).cross_entropy.item()


@pytest.mark.parametrize(
    ("kind", "placement", "init"),
    [("run", "symmetry_free", "one"), ("model", "none", "one"), ("hf", "full", "mup")],
)
def test_the_first_loss_is_the_source_models_loss_on_that_batch(source, data_root, tmp_path, kind, placement, init):
    root, artifact = source
    run_dir = tmp_path / "run"
    cfg = {"train.init_from": str(root / kind), "train.max_steps": 1, "lrm.placement": placement, "lrm.init": init}
    train(run_config(data_root, run_dir, **cfg))
    expected = loss_on_first_batch(artifact)
    assert first_losses(run_dir)[0] == pytest.approx(expected, rel=1e-5)
    train(run_config(data_root, tmp_path / "fresh", **{"train.max_steps": 1}))
    assert abs(first_losses(tmp_path / "fresh")[0] - expected) > 1e-3  # the same seed without init_from: another loss


def test_a_resumed_run_takes_its_checkpoint_not_init_from(source, data_root, tmp_path, monkeypatch):
    root, _ = source
    cfg = {"train.init_from": str(root / "model"), "train.max_steps": 2, "train.ckpt_every": 2}
    train(run_config(data_root, tmp_path / "run", **cfg))
    monkeypatch.setattr(build_module, "start_from", lambda *args: pytest.fail("init_from read on resume"))
    result = train(run_config(data_root, tmp_path / "run", **{**cfg, "train.max_steps": 3}))
    assert result.step == 3


def test_a_source_of_another_shape_or_tokenizer_is_one_line_naming_it(source, data_root, tmp_path):
    root, _ = source
    with pytest.raises(ValueError, match=r"init_from=.*model: its model has model.hidden_size=32, this run has 64$"):
        train(
            run_config(data_root, tmp_path / "a", **{"train.init_from": str(root / "model"), "model.hidden_size": 64})
        )
    (root / "hf" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"init_from=.*hf was trained with the tokenizer .*: set data.tokenizer="):
        train(run_config(data_root, tmp_path / "b", **{"train.init_from": str(root / "hf")}))
    with pytest.raises(ValueError, match=r"train.init_from=.*nothing: no such checkpoint, run directory or model"):
        run_config(data_root, tmp_path / "c", **{"train.init_from": str(tmp_path / "nothing")})
    assert not (tmp_path / "a" / "checkpoints").exists()
