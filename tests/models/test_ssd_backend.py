"""model.ssd_backend: its validation, what ``auto`` picks, and that the field stays out of saved models."""

import dataclasses
import json
import sys

import pytest
import torch

from lrm_train.models import FalconH1LM, falcon_h1_hf, preset, ssd
from lrm_train.models.io import load_model, save_model
from lrm_train.models.ssd import ssd_chunked_scan, ssd_scan_function
from lrm_train.nn import LRMConfig
from lrm_train.train.checkpoint import run_section
from lrm_train.train.config import RunConfig


def tiny(**overrides):
    return dataclasses.replace(preset("tiny"), num_hidden_layers=1, **overrides)


def test_an_unknown_backend_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"^model.ssd_backend='cuda' must be one of torch, triton, auto$"):
        tiny(ssd_backend="cuda")
    with pytest.raises(ValueError, match=r"^model.ssd_backend='cuda' must be one of torch, triton, auto$"):
        ssd_scan_function("cuda")


def test_auto_picks_the_torch_scan_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ssd_scan_function("auto") is ssd_chunked_scan
    assert ssd_scan_function("torch") is ssd_chunked_scan
    assert FalconH1LM(tiny()).layers[0].mamba.ssd_scan is ssd_chunked_scan


def test_auto_with_cuda_runs_triton_on_cuda_tensors_only(monkeypatch):
    """Where CUDA exists the device is still unknown at build (models move after it): the choice follows the inputs."""
    calls = []

    def fake_triton_scan(x, *args):
        calls.append(x.device.type)
        return torch.zeros_like(x)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ssd, "_triton_scan", lambda: fake_triton_scan)
    scan = ssd_scan_function("auto")
    assert scan.args == (fake_triton_scan, ssd_chunked_scan)  # what it runs on CUDA tensors, and elsewhere
    x, dt = torch.randn(1, 5, 2, 4), torch.rand(1, 5, 2)
    A, B, C, D = -torch.ones(2), torch.randn(1, 5, 1, 3), torch.randn(1, 5, 1, 3), torch.ones(2)
    torch.testing.assert_close(scan(x, dt, A, B, C, D, 4), ssd_chunked_scan(x, dt, A, B, C, D, 4))
    assert calls == []


def test_auto_falls_back_to_torch_when_triton_does_not_import(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    monkeypatch.delitem(sys.modules, "lrm_train.models.ssd_triton", raising=False)
    assert ssd_scan_function("auto") is ssd_chunked_scan
    with pytest.raises(ValueError, match=r"^model.ssd_backend=triton: the Triton scan does not import"):
        FalconH1LM(tiny(ssd_backend="triton"))


def test_the_backend_is_not_saved_with_a_model_folder(tmp_path):
    model = FalconH1LM(tiny(ssd_backend="torch"), LRMConfig("full"))
    save_model(model, tmp_path / "m")
    assert "ssd_backend" not in json.loads((tmp_path / "m" / "config.json").read_text())["model"]
    assert load_model(tmp_path / "m").cfg == dataclasses.replace(model.cfg, ssd_backend="auto")


def test_the_backend_is_not_exported_to_hugging_face():
    config = falcon_h1_hf.to_hf_config(tiny(ssd_backend="torch"))
    assert "ssd_backend" not in config
    imported = falcon_h1_hf.from_hf_config(config, source="config.json")
    assert imported.ssd_backend == "auto"
    expected = tiny().function_definition()
    for key, value in imported.function_definition().items():
        assert value == (pytest.approx(expected[key]) if isinstance(value, float | list) else expected[key]), key


def test_a_checkpoint_run_record_leaves_the_backend_out_so_resume_may_change_it(tmp_path):
    cfg = RunConfig()
    cfg.model = tiny(ssd_backend="torch")
    (tmp_path / "tokenizer.json").write_text("{}")
    record = run_section(cfg, global_batch=8, data_folder=tmp_path, tokenizer=tmp_path / "tokenizer.json")
    assert "ssd_backend" not in record["model_config"]
    assert record["model_config"]["hidden_size"] == 128
