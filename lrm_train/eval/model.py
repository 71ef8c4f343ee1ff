"""Our model inside lm-evaluation-harness: the ``lrm_train`` model (``--model lrm_train --model_args path=...``).

``path`` is anything ``train.artifact.open_artifact`` reads (a training checkpoint, a run directory, an lrm_train model
folder or a Hugging Face folder), with its tokenizer or ``tokenizer=PATH`` (a tokenizer.json).

Scoring follows the harness's ``hf`` model: the same context/continuation split (``TemplateLM``), the same rolling
windows, the end-of-document token as the prefix of an empty context; so the numbers compare with published ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tokenizers import Tokenizer
from torch import nn

from lrm_train.data.tokenizer import eos_id, load_tokenizer
from lrm_train.train.artifact import open_artifact

DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256

# A gather over ranks: this rank's list in, every rank's lists out (rank order). One process: itself.
Gather = Callable[[list], list[list]]


def _single_process(items: list) -> list[list]:
    return [items]


log = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@register_model("lrm_train")
class LRMHarnessLM(TemplateLM):
    """Scores requests with one of our models; ``gather`` spreads the work over training ranks (the in-loop callback:
    every rank sees every request, scores its share and receives every result)."""

    def __init__(
        self,
        path: str | None = None,
        tokenizer: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 8,
        max_length: int = DEFAULT_MAX_LENGTH,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        model: nn.Module | None = None,
        autocast: Callable | None = None,
        gather: Gather = _single_process,
        rank: int = 0,
        world_size: int = 1,
        **_ignored,
    ) -> None:
        super().__init__()
        if model is None:
            if path is None:
                raise ValueError("model_args: path=... (a checkpoint, run directory, model or HF folder) is required")
            artifact = open_artifact(path, tokenizer)
            model, tokenizer = artifact.model, artifact.tokenizer
        if tokenizer is None:
            raise ValueError("model_args: tokenizer=... (a tokenizer.json) is required")
        self._device = torch.device(device) if device else default_device()
        if self._device.type == "cuda" and not torch.cuda.is_available():
            # lm-eval's own CLI passes device=cuda:0 unless told otherwise, also on a machine without a GPU.
            log.warning("device=%s: CUDA is not available here; scoring on the CPU (pass --device cpu)", device)
            self._device = torch.device("cpu")
        # A model handed in (the trainer's) stays where it is and in its mode; one loaded here goes to the device.
        self.model = model.to(self._device).eval() if path is not None else model
        if autocast is None:
            # bf16 on CUDA (the precision we train in); float32 on CPU, where bf16 matrix products are ~20x slower.
            use_bf16 = dtype == "bfloat16" or (dtype == "auto" and self.device.type == "cuda")
            autocast = lambda: torch.autocast(self.device.type, torch.bfloat16, enabled=use_bf16)
        self.autocast = autocast
        self.tokenizer: Tokenizer = load_tokenizer(tokenizer)
        self._eot = eos_id(self.tokenizer, str(tokenizer))
        self.batch_size = 8 if batch_size == "auto" else int(batch_size)
        self.max_length, self.max_gen_toks = int(max_length), int(max_gen_toks)
        self.gather, self.share_rank, self.share_count = gather, rank, world_size

    @property
    def device(self) -> torch.device:
        return self._device

    # The harness's own rank/world_size stay 0/1: the harness hands every rank all requests, we split them.
    @property
    def eot_token_id(self) -> int:
        return self._eot

    def tok_encode(self, string: str, **_kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    @torch.no_grad()
    def _logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Log-probabilities (float32, CPU) at every position of each sequence, batched and right-padded: the model
        is causal (attention and Mamba alike), so padding after a sequence does not change its positions."""
        out = []
        for i in range(0, len(sequences), self.batch_size):
            batch = sequences[i : i + self.batch_size]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), self._eot, dtype=torch.long)
            for row, s in enumerate(batch):
                ids[row, : len(s)] = torch.tensor(s)
            with self.autocast():
                logits = self.model(ids.to(self._device))
            logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
            out += [logprobs[row, : len(s)] for row, s in enumerate(batch)]
        return out

    def _my_share(self, items: list) -> list:
        """This rank's items (strided), padded with copies to an equal count so every rank runs as many forwards
        (sharded engines gather weights in every forward, all ranks together)."""
        per_rank = -(-len(items) // self.share_count)
        mine = items[self.share_rank :: self.share_count]
        return mine + [items[0]] * (per_rank - len(mine)) if items else []

    def _unshare(self, results: list, count: int) -> list:
        per_rank = self.gather(results)
        return [per_rank[i % self.share_count][i // self.share_count] for i in range(count)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_kwargs) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        # Longest first: batches of similar length pad little.
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        mine = self._my_share(order)
        inputs = []
        for i in mine:
            context, continuation = pairs[i]
            inputs.append((context + continuation)[-(self.max_length + 1) :][:-1])
        scored = []
        for i, logprobs in zip(mine, self._logprobs(inputs)):
            continuation = torch.tensor(pairs[i][1])
            tail = logprobs[-len(continuation) :]
            greedy = bool((tail.argmax(-1) == continuation).all())
            scored.append((float(tail.gather(-1, continuation[:, None]).sum()), greedy))
        by_order = self._unshare(scored, len(order))
        results = [None] * len(pairs)
        for i, result in zip(order, by_order):
            results[i] = result
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for window in utils.get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1):
                windows.append((None, *utils.make_disjoint_window(window)))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (loglikelihood, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[n] += loglikelihood
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation until a stop string, the end-of-document token or ``max_gen_toks``. Requests with the
        same stop strings and token budget are decoded together, whatever their lengths."""
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            kwargs = request.args[1]
            until = kwargs.get("until") or []
            key = (tuple([until] if isinstance(until, str) else until), int(kwargs.get("max_gen_toks") or 0))
            groups.setdefault(key, []).append(i)
        generated = [""] * len(requests)
        for (until, max_gen_toks), members in groups.items():
            mine = self._my_share(members)
            texts = []
            for start in range(0, len(mine), self.batch_size):
                contexts = [self.tok_encode(requests[i].args[0]) for i in mine[start : start + self.batch_size]]
                texts += self._greedy(contexts, list(until), max_gen_toks or self.max_gen_toks)
            for i, text in zip(members, self._unshare(texts, len(members))):
                generated[i] = text
        for request, text in zip(requests, generated):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return generated

    def _greedy(self, contexts: list[list[int]], until: list[str], max_new: int) -> list[str]:
        """Greedy decoding of a batch of contexts of any lengths, right-padded: the model is causal, so each row's
        next token is read at its own last position and written just after it, over the padding. No KV cache:
        every step runs the model over the whole batch."""
        # An empty context starts from the end-of-document token, as in loglikelihood.
        contexts = [c[-(self.max_length - max_new) :] or [self._eot] for c in contexts]
        lengths = torch.tensor([len(c) for c in contexts], device=self._device)
        ids = torch.full((len(contexts), int(lengths.max()) + max_new), self._eot, device=self._device)
        for row, context in enumerate(contexts):
            ids[row, : len(context)] = torch.tensor(context)
        rows = torch.arange(len(contexts), device=self._device)
        new_tokens: list[list[int]] = [[] for _ in contexts]
        finished = [False] * len(contexts)
        # Every rank runs as many steps as the slowest (sharded engines need every rank in every forward).
        for _ in range(max_new):
            if all(self.gather(all(finished))):
                break
            with self.autocast():
                logits = self.model(ids[:, : int(lengths.max())])
            next_ids = logits[rows, lengths - 1].float().argmax(-1)
            ids[rows, lengths] = next_ids
            lengths += 1
            for row, token in enumerate(next_ids.tolist()):
                if not finished[row]:
                    new_tokens[row].append(token)
                    text = self.tok_decode(new_tokens[row])
                    finished[row] = token == self._eot or any(stop in text for stop in until)
        return [self._until_stop(tokens, until) for tokens in new_tokens]

    def _until_stop(self, tokens: list[int], until: list[str]) -> str:
        text = self.tok_decode(tokens[: tokens.index(self._eot)] if self._eot in tokens else tokens)
        for stop in until:
            text = text.split(stop)[0]
        return text
