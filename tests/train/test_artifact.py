"""``open_artifact``: every kind of folder a training leaves behind, recognised once and loaded once."""

import shutil

import pytest
import torch
from runs import run_config

import lrm_train.train.checkpoint as checkpoint_module
from lrm_train.hf import export_hf
from lrm_train.models.io import save_model
from lrm_train.train import RunConfig, train
from lrm_train.train.artifact import ArtifactKind, open_artifact


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("artifact") / "run"
    train(run_config(data_root, run_dir, **{"train.max_steps": 4, "train.ckpt_every": 2}))
    return run_dir


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_run_directory_is_its_newest_checkpoint_with_what_it_was_trained_as_and_on(run, monkeypatch):
    loads = []
    load = checkpoint_module.load_checkpoint
    monkeypatch.setattr(checkpoint_module, "load_checkpoint", lambda path: loads.append(path) or load(path))
    artifact = open_artifact(run)
    newest = run / "checkpoints" / "step_00000004"
    assert loads == [newest]  # read and verified once
    assert artifact.kind is ArtifactKind.CHECKPOINT and artifact.checkpoint == newest and artifact.run_dir == run
    assert artifact.tokenizer == newest / "tokenizer.json"
    assert isinstance(artifact.run_config, RunConfig)
    assert (artifact.run_config.data.seq_len, artifact.run_config.train.max_steps) == (32, 4)
    assert artifact.data_folder == artifact.data_folder.resolve() and (artifact.data_folder / "manifest.json").is_file()
    assert same_weights(artifact.model, open_artifact(newest).model)


def test_model_and_hf_folders_carry_their_tokenizer_or_are_given_one(run, tmp_path):
    trained = open_artifact(run)
    save_model(trained.model, tmp_path / "model")
    export_hf(trained.model, tmp_path / "export", tokenizer=trained.tokenizer)
    hf = open_artifact(tmp_path / "export")
    assert hf.kind is ArtifactKind.HF and hf.tokenizer == tmp_path / "export" / "tokenizer.json"
    assert hf.checkpoint is None and hf.run_config is None and hf.data_folder is None
    x = torch.randint(0, 512, (1, 16))
    torch.testing.assert_close(hf.model(x), trained.model(x), rtol=1e-5, atol=1e-5)  # multipliers folded, same model
    with pytest.raises(ValueError, match=r"model: it carries no tokenizer; pass tokenizer=PATH"):
        open_artifact(tmp_path / "model")
    model = open_artifact(tmp_path / "model", trained.tokenizer)
    assert model.kind is ArtifactKind.MODEL and model.tokenizer == trained.tokenizer
    assert same_weights(model.model, trained.model)
    assert open_artifact(tmp_path / "model", need_tokenizer=False).tokenizer is None


def test_what_is_not_an_artifact_is_one_line_naming_it(run, tmp_path):
    with pytest.raises(ValueError, match=r"nothing: no such checkpoint, run directory or model folder$"):
        open_artifact(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ValueError, match=r"empty: not a checkpoint, run directory, model folder or Hugging Face folder$"
    ):
        open_artifact(tmp_path / "empty")
    copy = tmp_path / "copy"
    shutil.copytree(run / "checkpoints" / "step_00000002", copy)
    (copy / "config.json").write_text("{}")  # a checkpoint is recognised by its manifest, whatever else it holds
    assert open_artifact(copy).kind is ArtifactKind.CHECKPOINT
