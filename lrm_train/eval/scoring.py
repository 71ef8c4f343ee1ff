"""Scores: the harness's metrics per task, the bits per byte of each item's correct continuation, and bits per
byte on the training corpus' validation split."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lrm_train.data import TokenData, validation_batches
from lrm_train.eval.tasks import DEFAULT_TASKS, task_specs

_HARNESS_KEYS_DROPPED = ("alias",)


def gold_index(task, doc: dict) -> int:
    """The correct choice of a multiple-choice item, found as the harness finds it (for Winogrande-style tasks,
    whose choices are contexts, it is the context's index)."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, str):
        gold = task.doc_to_choice(doc).index(gold)
    return int(gold)


def correct_continuation_bpb(task, samples: list[dict]) -> float:
    """OLMo's per-task bpb: -sum log p(correct continuation) / its UTF-8 bytes, in bits, over all items (it keeps
    moving while accuracy sits at chance). A loglikelihood task (LAMBADA) has one continuation per item."""
    nats = num_bytes = 0.0
    for sample in samples:
        gold = gold_index(task, sample["doc"]) if task.OUTPUT_TYPE == "multiple_choice" else 0
        nats -= sample["resps"][gold][0][0]
        num_bytes += len(_request_text(sample["arguments"][gold])[1].encode("utf-8"))
    return nats / num_bytes / math.log(2)


def _request_text(arguments) -> tuple[str, str]:
    # The harness logs a request's arguments either as the tuple or as {"gen_args_0": {"arg_0": ..., ...}}.
    if isinstance(arguments, dict):
        arguments = next(iter(arguments.values())) if "arg_0" not in arguments else arguments
        return arguments["arg_0"], arguments["arg_1"]
    return arguments[0], arguments[1]


def run_harness(lm, tasks=DEFAULT_TASKS, limit: float | None = None) -> dict:
    """``{task: {metric: value}}`` from the harness (``acc``, ``acc_norm``, LAMBADA's ``perplexity``, ...; the
    stderr entries dropped) plus ``bpb`` of the correct continuation for loglikelihood and multiple-choice tasks.

    The tasks are set up as ``simple_evaluate`` sets them up (zero-shot unless their config says otherwise, few-shot
    examples drawn with the harness's seed), then scored by the harness's ``evaluate``. Not ``simple_evaluate``
    itself: it reseeds the global RNGs (the trainer's, in the loop), collects an environment report (seconds, at
    every in-loop evaluation) and returns results only where LOCAL_RANK is 0, while every rank needs them.
    """
    from lm_eval.api.task import Task
    from lm_eval.defaults import DEFAULT_OTHER_SEED
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import setup_logging

    setup_logging("WARNING")
    # Without the default index (a minute to build): every offline task comes as its full config.
    specs = task_specs(tasks)
    task_manager = TaskManager(include_defaults=not all(isinstance(spec, dict) for spec in specs))
    loaded = task_manager.load(specs)
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    output = evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=True, bootstrap_iters=0)
    scores = {}
    for task, metrics in output["results"].items():
        scores[task] = {
            name.split(",")[0]: float(value)
            for name, value in metrics.items()
            if "_stderr" not in name and name not in _HARNESS_KEYS_DROPPED and isinstance(value, (int, float))
        }
    for name, task in loaded["tasks"].items():
        samples = output["samples"].get(name)
        if isinstance(task, Task) and samples and task.OUTPUT_TYPE in ("multiple_choice", "loglikelihood"):
            scores[name]["bpb"] = correct_continuation_bpb(task, samples)
    return scores


@torch.no_grad()
def validation_bpb(model, data_folder: str | Path, seq_len: int, max_windows: int, batch_size: int = 8) -> float:
    """Bits per byte of ``model`` on the prepared corpus' fixed validation windows: the summed next-token loss in
    bits over the UTF-8 bytes of the predicted tokens (comparable across tokenizers, unlike the loss)."""
    from lrm_train.data.tokenizer import load_tokenizer

    data = TokenData(data_folder)
    tokenizer = load_tokenizer(data.tokenizer_path)
    device = next(model.parameters()).device
    nats = num_bytes = 0.0
    for x, y in validation_batches(data.splits["val"], seq_len, max_windows, batch_size):
        logits = model(x.to(device)).float()
        nats += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum"))
        num_bytes += sum(len(tokenizer.decode(row.tolist()).encode("utf-8")) for row in y)
    return nats / num_bytes / math.log(2)
