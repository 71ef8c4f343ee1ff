"""A hand-made item whose scores are known: a model that gives every token the same probability."""

import logging
import math

import datasets
import numpy as np
import pytest
import torch
from torch import nn

from lrm_train.eval import LRMHarnessLM, run_harness

VOCAB = 512


class UniformLM(nn.Module):
    """Every next token has probability 1/VOCAB: a continuation's log-likelihood is -(its tokens) x log(VOCAB)."""

    def forward(self, input_ids):
        return torch.zeros(*input_ids.shape, VOCAB)


def handmade_task(gold: int) -> dict:
    # " the": 1 token, 4 characters; " abcdefghijklmnop abcdefghijklmnop": 2 tokens, 34 characters. acc picks the
    # likelier (fewer tokens): " the"; acc_norm divides by characters: the long one.
    doc = {"question": "Pick one:", "choices": [" the", " abcdefghijklmnop abcdefghijklmnop"], "gold": gold}
    return {
        "task": f"handmade_gold{gold}",
        "custom_dataset": lambda **_: datasets.DatasetDict({"test": datasets.Dataset.from_list([doc])}),
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }


@pytest.fixture(scope="module")
def scores(tokenizer_json):
    lm = LRMHarnessLM(model=UniformLM(), tokenizer=str(tokenizer_json), device="cpu")
    assert len(lm.tok_encode(" the")) == 1 and len(lm.tok_encode(" abcdefghijklmnop abcdefghijklmnop")) == 2
    return run_harness(lm, [handmade_task(0), handmade_task(1)])


def test_acc_and_acc_norm_pick_different_choices(scores):
    assert scores["handmade_gold0"]["acc"] == 1.0 and scores["handmade_gold0"]["acc_norm"] == 0.0
    assert scores["handmade_gold1"]["acc"] == 0.0 and scores["handmade_gold1"]["acc_norm"] == 1.0


def test_bpb_is_of_the_correct_continuation(scores):
    bits_per_token = math.log2(VOCAB)
    assert scores["handmade_gold0"]["bpb"] == pytest.approx(bits_per_token / 4)  # 1 token over 4 bytes
    assert scores["handmade_gold1"]["bpb"] == pytest.approx(2 * bits_per_token / 34)


def test_rolling_loglikelihood_counts_every_token_across_windows(tokenizer_json):
    lm = LRMHarnessLM(model=UniformLM(), tokenizer=str(tokenizer_json), device="cpu", max_length=3)
    text = " the cat the dog the cat the"  # 7 tokens: three windows of at most 3 predicted tokens

    class Request:
        args = (text,)

    assert len(lm.tok_encode(text)) == 7
    assert lm.loglikelihood_rolling([Request()]) == [pytest.approx(-7 * math.log(VOCAB))]


def test_scoring_does_not_reseed_the_global_generators(tokenizer_json):
    """In the loop, the harness must not reset the trainer's torch and NumPy generators (it seeds both by default)."""
    lm = LRMHarnessLM(model=UniformLM(), tokenizer=str(tokenizer_json), device="cpu")
    torch.manual_seed(5)
    np.random.seed(5)
    before = torch.get_rng_state(), np.random.get_state()[1].copy()
    run_harness(lm, [handmade_task(0)])
    assert torch.equal(torch.get_rng_state(), before[0]) and (np.random.get_state()[1] == before[1]).all()


def test_lm_evals_default_cuda_device_falls_back_to_the_cpu_where_there_is_none(tokenizer_json, caplog):
    # lm-eval's CLI passes device=cuda:0 unless told otherwise; the CPU suite hides any GPU.
    with caplog.at_level(logging.WARNING):
        lm = LRMHarnessLM(model=UniformLM(), tokenizer=str(tokenizer_json), device="cuda:0")
    assert lm.device == torch.device("cpu")
    assert "device=cuda:0: CUDA is not available here; scoring on the CPU" in caplog.text
