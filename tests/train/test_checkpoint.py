import copy
import hashlib
import io
import json
import os
import pickle

import pytest
import torch
from omegaconf import OmegaConf
from runs import run_config
from safetensors.torch import load_file, save

from lrm_train.train import compose, train
from lrm_train.train.artifact import open_artifact
from lrm_train.train.checkpoint import (
    check_resumable,
    join_tensors,
    load_checkpoint,
    load_resumable,
    model_from_checkpoint,
    run_section,
    save_checkpoint,
    split_tensors,
)


def test_tensors_and_plain_data_round_trip(tmp_path):
    state = {
        "step": 3,
        "nested": {"a": torch.arange(4), "b": [torch.ones(2, 2), "text", 1.5]},
        "t": (1, torch.zeros(())),
    }
    tensors = {}
    plain = split_tensors(state, tensors)
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    back = join_tensors(plain, tensors)
    assert back["step"] == 3 and torch.equal(back["nested"]["b"][0], torch.ones(2, 2)) and back["t"][0] == 1
    (tmp_path / "tok.json").write_text("{}")
    save_checkpoint(tmp_path / "c", {"w": torch.ones(3)}, state, step=3, tokenizer=tmp_path / "tok.json")
    model_state, loaded = load_checkpoint(tmp_path / "c")
    assert torch.equal(model_state["w"], torch.ones(3)) and torch.equal(loaded["nested"]["a"], torch.arange(4))
    assert (tmp_path / "c" / "tokenizer.json").read_text() == "{}"  # carried, and covered by the manifest:
    assert "tokenizer.json" in json.loads((tmp_path / "c" / "checkpoint.json").read_text())["files"]


@pytest.fixture
def checkpoint(data_root, tmp_path):
    return train(run_config(data_root, tmp_path, **{"train.max_steps": 4})).last_checkpoint


def test_a_tampered_file_is_refused(checkpoint):
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors does not match its checksum"):
        load_checkpoint(checkpoint)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_checkpoint_that_would_run_code_is_refused_even_with_a_matching_checksum(checkpoint):
    state = checkpoint / "state.pt"
    state.write_bytes(pickle.dumps({"step": 1, "evil": _RunsCode()}))
    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    manifest["files"]["state.pt"] = hashlib.sha256(state.read_bytes()).hexdigest()
    (checkpoint / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="state.pt is not plain data .*; it is refused on purpose"):
        load_checkpoint(checkpoint)


def test_resume_from_an_explicit_path_and_config_mismatch(data_root, tmp_path, checkpoint):
    cfg = run_config(data_root, tmp_path / "other", **{"train.resume": str(checkpoint), "model.num_hidden_layers": 3})
    with pytest.raises(ValueError, match="trained with model.num_hidden_layers=2, this run has 3"):
        train(cfg)
    cfg = run_config(data_root, tmp_path / "other", **{"train.resume": str(checkpoint), "train.grad_accum": 2})
    with pytest.raises(ValueError, match="adjust train.grad_accum"):
        train(cfg)
    cfg = run_config(data_root, tmp_path / "other", **{"train.resume": str(checkpoint), "optim.name": "muon"})
    with pytest.raises(ValueError, match="trained with optim=adamw, this run has optim=muon"):
        train(cfg)
    with pytest.raises(ValueError, match="no such checkpoint folder"):
        train(run_config(data_root, tmp_path / "other", **{"train.resume": str(tmp_path / "nope")}))


def test_a_checkpoint_from_before_a_model_field_existed_resumes_when_the_field_has_its_default(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    this = run_section(compose(["model.parametrization=standard"]), 8, tmp_path, tmp_path / "tokenizer.json")
    saved = copy.deepcopy(this)
    for field in ("parametrization", "base_width", "mamba_a_init_range"):  # written before these existed
        del saved["model_config"][field]
    check_resumable(saved, this, tmp_path)
    mup = run_section(
        compose([]), 8, tmp_path, tmp_path / "tokenizer.json"
    )  # tiny is now a muP transfer: another model
    with pytest.raises(ValueError, match="trained with model.parametrization='standard', this run has 'mup'"):
        check_resumable(saved, mup, tmp_path)


def test_a_checkpoint_with_lrm_weight_decay_loads_and_a_resume_may_change_the_multipliers_decay(
    data_root, tmp_path, checkpoint
):
    # As written while the multipliers' decay was lrm.weight_decay: in run.lrm and in the recorded config.
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    config = OmegaConf.create(state["run"]["config"])
    config.optim.pop("multiplier_weight_decay")
    config.lrm.weight_decay = 5e-3
    state["run"]["config"] = OmegaConf.to_yaml(config)
    state["run"]["lrm"]["weight_decay"] = 5e-3
    _rewrite(checkpoint, "state.pt", _torch_bytes(state))

    run = load_resumable(checkpoint)[1]["run"]
    assert "weight_decay" not in run["lrm"]
    assert OmegaConf.create(run["config"]).optim.multiplier_weight_decay == 5e-3
    artifact = open_artifact(checkpoint)  # the reader of eval and export: the run config through today's schema
    assert artifact.run_config.optim.multiplier_weight_decay == 5e-3 and artifact.model.lrm.placement == "full"
    overrides = {"train.resume": str(checkpoint), "train.max_steps": 6, "optim.multiplier_weight_decay": 1e-2}
    result = train(run_config(data_root, tmp_path / "other", **overrides))
    assert result.step == 6
    resumed = OmegaConf.create(load_resumable(result.last_checkpoint)[1]["run"]["config"])
    assert resumed.optim.multiplier_weight_decay == 1e-2


def test_a_training_checkpoint_exports_to_transformers(checkpoint, tmp_path):
    from transformers import FalconH1ForCausalLM

    from lrm_train.hf.__main__ import main as hf_cli
    from lrm_train.train.checkpoint import model_from_checkpoint

    assert hf_cli(["export", str(checkpoint), str(tmp_path / "hf")]) == 0
    ours = model_from_checkpoint(checkpoint)
    theirs = FalconH1ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        expected = ours(ids)
        assert ((theirs(ids).logits - expected).norm() / expected.norm()).item() < 1e-4


def _rewrite(checkpoint, name, data: bytes) -> None:
    """Replace a file and its checksum, as a tool of another version (or a bug) would write it."""
    (checkpoint / name).write_bytes(data)
    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    manifest["files"][name] = hashlib.sha256(data).hexdigest()
    (checkpoint / "checkpoint.json").write_text(json.dumps(manifest))


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "state,message",
    [
        ({"step": 4, "model_config": {}}, "no format version \\(written by an older lrm_train\\)"),
        ({"format": "lrm_train.checkpoint/1"}, "format 'lrm_train.checkpoint/1'; this lrm_train reads"),
        ({"format": "lrm_train.checkpoint/2", "run": {}}, "state.pt lacks trainer, optimizer, loader"),
        ([1, 2, 3], "no format version"),
    ],
)
def test_a_checkpoint_of_another_format_or_structure_is_one_line(data_root, tmp_path, checkpoint, state, message):
    _rewrite(checkpoint, "state.pt", _torch_bytes(state))
    with pytest.raises(ValueError, match=f"checkpoint {checkpoint}: {message}"):
        train(run_config(data_root, tmp_path / "other", **{"train.resume": str(checkpoint)}))


def test_weights_that_do_not_fit_the_model_are_one_line(data_root, tmp_path, checkpoint):
    weights = load_file(checkpoint / "model.safetensors")
    weights.pop("lm_head.weight")
    _rewrite(checkpoint, "model.safetensors", save(weights))
    with pytest.raises(
        ValueError,
        match=rf"checkpoint {checkpoint}: its weights were made for another model .* \(1 tensors missing, e.g. lm_head.weight\)",
    ):
        train(run_config(data_root, tmp_path / "other", **{"train.resume": str(checkpoint)}))


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(
    data_root, tmp_path, monkeypatch, capsys
):
    import errno

    from runs import as_args, overrides

    from lrm_train.train import checkpoint as checkpoint_module
    from lrm_train.train.__main__ import main

    real_save = checkpoint_module.save_file

    def full_at_step_8(tensors, path, *args, **kwargs):
        if "step_00000008" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", full_at_step_8)
    assert main(as_args(overrides(data_root, tmp_path))) == 2
    target = tmp_path / "checkpoints" / "step_00000008"
    assert capsys.readouterr().err.splitlines()[-1] == f"error: cannot write {target}: No space left on device"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000004"]


def test_a_weights_only_final_checkpoint_holds_the_model_alone_and_ends_the_run(data_root, tmp_path):
    steps = {"train.max_steps": 4, "train.ckpt_every": 2}
    full = train(run_config(data_root, tmp_path / "full", **steps)).last_checkpoint
    cfg = run_config(data_root, tmp_path / "weights", **steps, **{"train.final_checkpoint": "weights"})
    final = train(cfg).last_checkpoint
    assert final.name == "step_00000004" and not list(final.glob("optimizer*"))
    earlier = final.parent / "step_00000002"
    assert list(earlier.glob("optimizer*")), "only the final checkpoint leaves the optimizer out"
    weights, state = load_checkpoint(final)
    assert state["optimizer"] is None and state["trainer"]["step"] == 4
    for name, tensor in load_checkpoint(full)[0].items():
        assert torch.equal(weights[name], tensor), name
    model = model_from_checkpoint(final)  # what evaluation and export read
    assert torch.equal(model.state_dict()["lm_head.weight"], weights["lm_head.weight"])

    manifest = (final / "checkpoint.json").read_text()
    assert train(cfg).step == 4 and (final / "checkpoint.json").read_text() == manifest  # finished: nothing to do
    longer = run_config(data_root, tmp_path / "weights", **{**steps, "train.max_steps": 6})
    with pytest.raises(ValueError, match=r"step_00000004: holds the model only \(train.final_checkpoint=weights\)"):
        train(longer)
    assert (final / "checkpoint.json").read_text() == manifest
    assert train(run_config(data_root, tmp_path / "next", **{"train.init_from": str(final)})).step > 0
