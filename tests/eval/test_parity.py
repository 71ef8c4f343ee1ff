"""Our harness model against the harness's own ``hf`` model on the exported folder (multipliers folded)."""

import pytest
import torch
from runs import MICRO_MODEL
from transformers import AutoTokenizer

from lrm_train.eval import LRMHarnessLM, run_harness
from lrm_train.hf import export_hf
from lrm_train.models import FalconH1Config, FalconH1LM
from lrm_train.models.io import save_model
from lrm_train.nn import MULTIPLIER_NAMES, LRMConfig

TASKS = ["arc_easy", "lambada_openai"]
LIMIT = 3
TEXT = "The cat sat on the mat. Is it yes or no?"


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer_json):
    torch.manual_seed(0)
    model = FalconH1LM(FalconH1Config(**MICRO_MODEL), LRMConfig(placement="full"))
    with torch.no_grad():  # multipliers far from 1, so folding them into the weights changes every tensor
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in MULTIPLIER_NAMES:
                param.uniform_(0.5, 2.0)
    root = tmp_path_factory.mktemp("parity")
    return save_model(model, root / "model"), export_hf(model, root / "hf", tokenizer=tokenizer_json)


@pytest.fixture(scope="module")
def unfolded_scores(folders, tokenizer_json):
    lm = LRMHarnessLM(path=str(folders[0]), tokenizer=str(tokenizer_json), device="cpu", batch_size=4)
    return run_harness(lm, TASKS, LIMIT)


def assert_same_scores(found, expected):
    assert found.keys() == expected.keys()
    for task, metrics in expected.items():
        for metric, value in metrics.items():
            assert found[task][metric] == pytest.approx(value, rel=1e-4), (task, metric)


def test_the_export_carries_a_tokenizer_transformers_loads(folders, tokenizer_json):
    ours = LRMHarnessLM(path=str(folders[1]), device="cpu")  # its tokenizer comes from the folder
    theirs = AutoTokenizer.from_pretrained(folders[1])
    assert theirs.encode(TEXT, add_special_tokens=False) == ours.tok_encode(TEXT)
    assert theirs.eos_token_id == ours.eot_token_id


def test_the_harness_hf_model_on_the_folded_export_scores_as_our_unfolded_model(folders, unfolded_scores):
    from lm_eval.models.huggingface import HFLM

    theirs = HFLM(pretrained=str(folders[1]), device="cpu", batch_size=4, dtype="float32")
    scores = run_harness(theirs, TASKS, LIMIT)
    assert_same_scores(scores, unfolded_scores)
    assert unfolded_scores["lambada_openai"]["perplexity"] > 1 and 0 < unfolded_scores["arc_easy"]["bpb"]


def test_our_model_on_the_export_scores_as_on_the_model_folder(folders, unfolded_scores):
    lm = LRMHarnessLM(path=str(folders[1]), device="cpu", batch_size=2)
    assert_same_scores(run_harness(lm, TASKS, LIMIT), unfolded_scores)
