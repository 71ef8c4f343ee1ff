"""A model family plugs into lrm_train.hf through models.hf_mapping alone."""

import dataclasses
import json
from types import SimpleNamespace

import torch
from torch import nn

from lrm_train.hf import export_hf, import_hf
from lrm_train.models import hf_mapping


@dataclasses.dataclass
class ToyConfig:
    vocab_size: int = 11
    hidden_size: int = 4


class ToyLM(nn.Module):
    def __init__(self, cfg: ToyConfig, lrm=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


TOY = SimpleNamespace(
    MODEL_TYPE="toy",
    ARCHITECTURE="ToyForCausalLM",
    MODEL_CLASS=ToyLM,
    to_hf_config=dataclasses.asdict,
    from_hf_config=lambda config, source: ToyConfig(config["vocab_size"], config["hidden_size"]),
    to_hf_state=lambda model: {"toy.embed.weight": model.embed.weight.detach()},
    from_hf_state=lambda state, model: {"embed.weight": state["toy.embed.weight"]},
)


def test_a_second_family_exports_and_imports_without_an_edit_in_hf(tmp_path, monkeypatch, small_model):
    monkeypatch.setattr(hf_mapping, "HF_MAPPINGS", (*hf_mapping.HF_MAPPINGS, TOY))
    toy = ToyLM(ToyConfig(vocab_size=7))
    export_hf(toy, tmp_path / "toy")
    config = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert config == {"architectures": ["ToyForCausalLM"], "model_type": "toy", "vocab_size": 7, "hidden_size": 4}
    back = import_hf(tmp_path / "toy")
    assert isinstance(back, ToyLM) and back.cfg == toy.cfg
    torch.testing.assert_close(back.embed.weight, toy.embed.weight, rtol=0, atol=0)
    export_hf(small_model, tmp_path / "falcon")  # the families live side by side
    assert type(import_hf(tmp_path / "falcon")) is type(small_model)
