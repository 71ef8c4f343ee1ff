"""What an exported folder holds, and one ValueError line naming the folder and the culprit for a broken one."""

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from lrm_train.hf import export_hf, import_hf
from lrm_train.models import FalconH1LM


@pytest.fixture
def hf_dir(tmp_path, small_model):
    return export_hf(small_model, tmp_path / "hf")


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


def edit_weights(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def refused(folder, culprit):
    """Expect one ValueError line that names ``folder`` and then ``culprit``."""
    return pytest.raises(ValueError, match=f"^{re.escape(str(folder))}.*{re.escape(culprit)}[^\n]*$")


def test_export_writes_rope_theta_at_the_top_level_too(tmp_path, small_model):
    from transformers import FalconH1ForCausalLM

    model = FalconH1LM(dataclasses.replace(small_model.cfg, rope_theta=5e5))
    config = json.loads((export_hf(model, tmp_path / "hf") / "config.json").read_text())
    assert config["rope_theta"] == 5e5  # transformers before 5.0 reads only this key
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 5e5}
    assert FalconH1ForCausalLM.from_pretrained(tmp_path / "hf").config.rope_parameters["rope_theta"] == 5e5
    edit_config(tmp_path / "hf", rope_parameters=None)  # a folder written by an older transformers
    assert import_hf(tmp_path / "hf").cfg.rope_theta == 5e5


def test_import_takes_a_placement_name(hf_dir):
    assert import_hf(hf_dir, "symmetry_free").lrm.placement == "symmetry_free"
    assert import_hf(hf_dir).lrm.placement == "full"
    with pytest.raises(ValueError, match="lrm.placement='everywhere' is not one of"):
        import_hf(hf_dir, "everywhere")


def test_missing_unexpected_or_misshaped_tensors_are_named(hf_dir):
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    edit_weights(hf_dir, lambda tensors: tensors.pop(q_proj))
    with refused(hf_dir, f"tensor {q_proj!r} is missing"):
        import_hf(hf_dir)
    edit_weights(hf_dir, lambda tensors: tensors.update({q_proj: torch.zeros(32, 31)}))
    with refused(hf_dir, f"tensor {q_proj!r} has shape (32, 31), expected (32, 32)"):
        import_hf(hf_dir)
    in_proj = "model.layers.0.mamba.in_proj.weight"
    edit_weights(hf_dir, lambda tensors: tensors.update({q_proj: torch.zeros(32, 32), in_proj: torch.zeros(99, 32)}))
    with refused(hf_dir, f"tensor {in_proj!r} has shape (99, 32), expected (84, 32)"):
        import_hf(hf_dir)
    edit_weights(
        hf_dir, lambda tensors: tensors.update({in_proj: torch.zeros(84, 32), "model.extra.bias": torch.ones(2)})
    )
    with refused(hf_dir, "unexpected tensor 'model.extra.bias'"):
        import_hf(hf_dir)
    edit_weights(hf_dir, lambda tensors: tensors.pop("model.extra.bias"))
    assert import_hf(hf_dir).layers[0].mamba.in_proj["dt"].weight.abs().sum() == 0


def test_another_architecture_or_a_missing_config_key_is_named(hf_dir):
    config = hf_dir / "config.json"
    edit_config(hf_dir, model_type="llama")
    with refused(config, "model_type='llama' is not one lrm_train imports (falcon_h1)"):
        import_hf(hf_dir)
    edit_config(hf_dir, model_type="falcon_h1", architectures=["FalconH1Model"])
    with refused(config, "architectures=['FalconH1Model'], expected ['FalconH1ForCausalLM']"):
        import_hf(hf_dir)
    edit_config(hf_dir, architectures=None, model_type=None)
    with refused(config, "model_type is missing"):
        import_hf(hf_dir)
    edit_config(hf_dir, model_type="falcon_h1", hidden_size=None)
    with refused(config, "hidden_size is missing"):
        import_hf(hf_dir)


def test_a_missing_or_unreadable_file_is_named(hf_dir, tmp_path):
    (hf_dir / "model.safetensors").unlink()
    with refused(hf_dir / "model.safetensors", "no such file"):
        import_hf(hf_dir)
    (hf_dir / "config.json").write_text("{")
    with refused(hf_dir / "config.json", "not valid JSON"):
        import_hf(hf_dir)
    (hf_dir / "config.json").unlink()
    with refused(hf_dir / "config.json", "no such file"):
        import_hf(hf_dir)
    with refused(tmp_path / "nowhere", "no such file"):
        import_hf(tmp_path / "nowhere")
