"""Greedy generation through the harness model (generate_until) against a hand-written greedy loop."""

import threading

import pytest
import torch
from runs import MICRO_MODEL
from torch import nn

from lrm_train.eval import LRMHarnessLM
from lrm_train.models import FalconH1Config, FalconH1LM
from lrm_train.nn import LRMConfig

CONTEXTS = ["The cat", "Is it yes or no? It is", "The cat sat on the mat, and the dog barked at the"]


class CountingModel(nn.Module):
    """The model, counting its forward calls and the rows they carried."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls, self.rows = model, 0, 0

    def forward(self, input_ids):
        self.calls, self.rows = self.calls + 1, self.rows + input_ids.shape[0]
        return self.model(input_ids)


class Request:
    def __init__(self, context: str, until: list[str], max_gen_toks: int) -> None:
        self.args = (context, {"until": until, "max_gen_toks": max_gen_toks})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FalconH1LM(FalconH1Config(**MICRO_MODEL), LRMConfig(placement="full")).eval()


def harness_model(model, tokenizer_json, **kwargs) -> LRMHarnessLM:
    return LRMHarnessLM(model=CountingModel(model), tokenizer=str(tokenizer_json), device="cpu", **kwargs)


@torch.no_grad()
def greedy_by_hand(lm: LRMHarnessLM, context: str, until: list[str], max_gen_toks: int) -> str:
    """One sequence at a time, the whole sequence through the model at every step."""
    ids, new = lm.tok_encode(context), []
    for _ in range(max_gen_toks):
        token = int(lm.model.model(torch.tensor([ids]))[0, -1].argmax())
        if token == lm.eot_token_id:
            break
        ids.append(token)
        new.append(token)
        if any(stop in lm.tok_decode(new) for stop in until):
            break
    text = lm.tok_decode(new)
    for stop in until:
        text = text.split(stop)[0]
    return text


def test_contexts_of_different_lengths_decode_together_as_each_alone(model, tokenizer_json):
    lm = harness_model(model, tokenizer_json, batch_size=4)
    assert len({len(lm.tok_encode(c)) for c in CONTEXTS}) == len(CONTEXTS)
    texts = lm.generate_until([Request(c, [], 6) for c in CONTEXTS])
    assert lm.model.calls == 6 and lm.model.rows == 6 * len(CONTEXTS)  # one batch, one forward per new token
    assert texts == [greedy_by_hand(lm, c, [], 6) for c in CONTEXTS]
    assert all(texts)


def test_a_stop_string_ends_the_text_before_it(model, tokenizer_json):
    lm = harness_model(model, tokenizer_json)
    unstopped = greedy_by_hand(lm, CONTEXTS[1], [], 10)
    stop = unstopped[len(unstopped) // 2 :][:2]  # a piece from its middle: the text before it is kept
    assert stop.strip() and unstopped.index(stop) > 0
    [text] = lm.generate_until([Request(CONTEXTS[1], [stop], 10)])
    assert text == unstopped[: unstopped.index(stop)] == greedy_by_hand(lm, CONTEXTS[1], [stop], 10)
    assert lm.model.calls < 10  # decoding stopped at the stop string


def test_max_gen_toks_and_stop_strings_differ_per_request(model, tokenizer_json):
    lm = harness_model(model, tokenizer_json, batch_size=8)
    requests = [Request(CONTEXTS[0], [], 2), Request(CONTEXTS[1], [], 5), Request(CONTEXTS[2], [], 2)]
    requests.append(Request(CONTEXTS[0], [greedy_by_hand(lm, CONTEXTS[0], [], 4)[-2:]], 4))
    expected = [greedy_by_hand(lm, r.args[0], r.args[1]["until"], r.args[1]["max_gen_toks"]) for r in requests]
    assert lm.generate_until(requests) == expected
    longer = greedy_by_hand(lm, CONTEXTS[0], [], 5)
    assert longer.startswith(expected[0]) and len(expected[0]) < len(longer)  # the budget cut it


def test_two_ranks_split_the_requests_and_both_return_all_texts(model, tokenizer_json):
    """Two harness models in two threads, gathering through a barrier: each decodes half, both get every text."""
    requests = [Request(c, [], 4) for c in CONTEXTS] + [Request(CONTEXTS[0], [], 3)]
    barrier, slots, out = threading.Barrier(2, timeout=60), [None, None], [None, None]

    def run(rank: int) -> None:
        def gather(item):
            slots[rank] = item
            barrier.wait()
            gathered = list(slots)
            barrier.wait()
            return gathered

        lm = harness_model(model, tokenizer_json, gather=gather, rank=rank, world_size=2)
        out[rank] = (lm.generate_until(requests), lm.model.rows)

    threads = [threading.Thread(target=run, args=(rank,), daemon=True) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    one_process = harness_model(model, tokenizer_json)
    expected = one_process.generate_until(requests)
    assert out[0][0] == out[1][0] == expected
    assert out[0][1] < one_process.model.rows and out[1][1] < one_process.model.rows  # each did a share
