import json

import pytest
import torch

from lrm_train.models import FalconH1LM, preset
from lrm_train.models.io import load_model, save_model
from lrm_train.nn import LRMConfig


def test_save_load_round_trip_keeps_config_placement_and_function(tmp_path):
    model = FalconH1LM(preset("tiny"), LRMConfig("symmetry_free", init="mup"))
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.lrm_row.mul_(1.5)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.cfg == model.cfg and loaded.lrm == model.lrm
    ids = torch.randint(0, 8192, (1, 9))
    torch.testing.assert_close(loaded(ids), model(ids))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directory left behind


def test_corrupt_or_mismatched_weights_are_refused_by_name(tmp_path):
    model = FalconH1LM(preset("tiny"), LRMConfig("full"))
    save_model(model, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_model(tmp_path / "m")
    save_model(FalconH1LM(preset("tiny"), LRMConfig("none")), tmp_path / "none")
    (tmp_path / "none" / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    with pytest.raises(ValueError, match="tensor '.*lrm_.*' is missing"):
        load_model(tmp_path / "none")


def test_save_model_overwrites_only_a_folder_lrm_train_wrote(tmp_path, monkeypatch):
    model = FalconH1LM(preset("tiny"), LRMConfig("none"))
    (tmp_path / "empty").mkdir()
    save_model(model, tmp_path / "empty")  # an empty folder is free to take
    with pytest.raises(FileExistsError, match="already exists"):
        save_model(model, tmp_path / "empty")
    save_model(FalconH1LM(preset("tiny"), LRMConfig("full")), tmp_path / "empty", overwrite=True)
    assert load_model(tmp_path / "empty").lrm.placement == "full"

    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"theirs: lrm_train did not write it"):
        save_model(model, tmp_path / "theirs", overwrite=True)
    assert (tmp_path / "theirs" / "config.json").read_text() == "{}"

    with pytest.raises(FileExistsError, match="holds the source"):
        save_model(model, tmp_path, overwrite=True, sources=[tmp_path / "empty"])
    monkeypatch.chdir(tmp_path / "empty")
    with pytest.raises(FileExistsError, match="current directory"):
        save_model(model, ".", overwrite=True)
    assert load_model(tmp_path / "empty").lrm.placement == "full"


def test_a_model_folder_written_while_lrm_carried_the_weight_decay_still_loads(tmp_path):
    model = FalconH1LM(preset("tiny"), LRMConfig("scalar"))
    save_model(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "weight_decay" not in config["lrm"]
    config["lrm"]["weight_decay"] = 2e-3
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    loaded = load_model(tmp_path / "m")
    assert loaded.lrm == model.lrm
    ids = torch.randint(0, 8192, (1, 5))
    torch.testing.assert_close(loaded(ids), model(ids))
