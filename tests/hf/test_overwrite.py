"""``--overwrite`` replaces only a folder lrm_train wrote, never the source, the current directory or $HOME."""

import pytest
import torch

from lrm_train.hf import export_hf
from lrm_train.hf.__main__ import main as hf_cli
from lrm_train.models.io import load_model, save_model


@pytest.fixture
def model_dir(tmp_path, small_model):
    return save_model(small_model, tmp_path / "model")


def refused(capsys, argv, culprit):
    """The CLI exits 2 with one error line that names the culprit."""
    capsys.readouterr()
    assert hf_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and culprit in err, err
    return err


def test_export_overwrite_never_deletes_the_current_directory(model_dir, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    refused(capsys, ["export", str(model_dir), ".", "--overwrite"], "current directory")
    assert (work / "notes.txt").read_text() == "mine"
    (work / "notes.txt").unlink()  # not even when it is empty: the shell would be left in a deleted folder
    refused(capsys, ["export", str(model_dir), ".", "--overwrite"], "current directory")
    assert work.is_dir()


def test_export_overwrite_never_deletes_its_source_or_a_folder_holding_it(model_dir, small_model, capsys):
    refused(capsys, ["export", str(model_dir), str(model_dir), "--overwrite"], str(model_dir))
    refused(capsys, ["export", str(model_dir), str(model_dir.parent), "--overwrite"], str(model_dir.parent))
    assert load_model(model_dir).cfg == small_model.cfg


def test_import_overwrite_never_deletes_its_source(model_dir, tmp_path, capsys):
    assert hf_cli(["export", str(model_dir), str(tmp_path / "hf")]) == 0
    refused(capsys, ["import", str(tmp_path / "hf"), str(tmp_path / "hf"), "--overwrite"], str(tmp_path / "hf"))
    assert hf_cli(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0


def test_overwrite_never_deletes_home(model_dir, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    refused(capsys, ["export", str(model_dir), str(home), "--overwrite"], "home directory")
    assert (home / ".bashrc").read_text() == "mine"


def test_overwrite_refuses_a_folder_lrm_train_did_not_write(model_dir, tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "results.csv").write_text("1,2,3")
    refused(capsys, ["export", str(model_dir), str(theirs), "--overwrite"], "results.csv")
    assert (theirs / "results.csv").read_text() == "1,2,3"
    # An export the user added a file to is theirs too.
    assert hf_cli(["export", str(model_dir), str(tmp_path / "hf")]) == 0
    (tmp_path / "hf" / "notes.txt").write_text("{}")
    refused(capsys, ["export", str(model_dir), str(tmp_path / "hf"), "--overwrite"], "notes.txt")
    assert (tmp_path / "hf" / "notes.txt").exists()
    (tmp_path / "file").write_text("x")
    refused(capsys, ["export", str(model_dir), str(tmp_path / "file"), "--overwrite"], "not a folder")
    assert (tmp_path / "file").read_text() == "x"


def test_overwrite_replaces_an_export_or_a_model_folder_lrm_train_wrote(model_dir, tmp_path, capsys):
    assert hf_cli(["export", str(model_dir), str(tmp_path / "hf")]) == 0
    refused(capsys, ["export", str(model_dir), str(tmp_path / "hf")], "already exists")
    assert hf_cli(["export", str(model_dir), str(tmp_path / "hf"), "--overwrite"]) == 0
    assert hf_cli(["import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert hf_cli(["import", str(tmp_path / "hf"), str(tmp_path / "ours"), "--overwrite", "--placement", "none"]) == 0
    assert load_model(tmp_path / "ours").lrm.placement == "none"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model", "ours"]  # no temporaries left


def test_export_into_an_existing_empty_folder_needs_no_overwrite(model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    assert hf_cli(["export", str(model_dir), str(tmp_path / "empty")]) == 0
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["config.json", "model.safetensors"]


def test_export_hf_api_follows_the_same_rules(tmp_path, small_model):
    model = small_model
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "data.bin").write_bytes(b"\1")
    with pytest.raises(FileExistsError, match="data.bin"):
        export_hf(model, tmp_path / "theirs", overwrite=True)
    export_hf(model, tmp_path / "hf")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    export_hf(model, tmp_path / "hf", overwrite=True)
    assert (tmp_path / "theirs" / "data.bin").read_bytes() == b"\1"


def test_the_convention_of_every_command_and_the_argparse_spellings_give_the_same_config():
    from lrm_train.hf.__main__ import HFExport, HFImport, compose, with_old_flags

    new = compose(["import", "a", "b", "placement=symmetry_free", "init=mup", "lm_head_rows=true", "overwrite=true"])
    old = compose(
        with_old_flags(
            ["import", "a", "b", "--placement", "symmetry_free", "--init", "mup", "--lm-head-rows", "--overwrite"]
        )
    )
    assert new == old == HFImport("a", "b", "symmetry_free", "mup", True, True)
    assert compose(["export", "a", "b"]) == HFExport("a", "b", None, False)
    with pytest.raises(ValueError, match="unknown config key 'placment'"):
        compose(["import", "a", "b", "placment=full"])
    with pytest.raises(ValueError, match=r"placement.*Invalid value 'everywhere'"):
        compose(["import", "a", "b", "placement=everywhere"])
    with pytest.raises(ValueError, match="expected import HF_DIR OUT_DIR or export SOURCE OUT_DIR first"):
        compose(["convert", "a", "b"])
