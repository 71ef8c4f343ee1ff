"""Data pipeline throughput on the default corpus, next to what the tiny model consumes when it trains.

    python scripts/bench_data.py [--batch 8] [--seq-len 256]

Prints: prepare (tokenizer training + parallel tokenization + shard writing) in tokens/s, the loader in tokens/s,
and the tiny model's training step (forward, backward, AdamW) in tokens/s on the same machine, with the ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time

import torch

from lrm_train.data import BatchLoader, DataConfig, TokenData
from lrm_train.data.prepare import prepare
from lrm_train.models import FalconH1LM, preset
from lrm_train.nn import LRMConfig, lm_loss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--loader-steps", type=int, default=2000)
    parser.add_argument("--train-steps", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        folder = prepare(DataConfig(out_root=tmp))
        prepare_seconds = time.perf_counter() - started
        manifest = json.loads((folder / "manifest.json").read_text())
        tokens = sum(split["tokens"] for split in manifest["splits"].values())

        loader = BatchLoader(TokenData(folder).splits["train"], args.seq_len, args.batch, seed=0)
        next(loader)
        started = time.perf_counter()
        for _ in range(args.loader_steps):
            next(loader)
        loader_rate = args.loader_steps * args.batch * args.seq_len / (time.perf_counter() - started)

        model = FalconH1LM(preset("tiny"), LRMConfig("full"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        times = []
        for step in range(args.train_steps + 1):
            inputs, targets = next(loader)
            started = time.perf_counter()
            lm_loss(model(inputs), targets).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:
                times.append(time.perf_counter() - started)
        train_rate = args.batch * args.seq_len * len(times) / sum(times)

    print(f"default corpus: {manifest['source']}, {tokens:,} tokens, vocab {manifest['tokenizer']['vocab_size']}")
    print(f"{'stage':<46}{'tokens/s':>14}")
    print(f"{'prepare (BPE training + tokenize + write)':<46}{tokens / prepare_seconds:>14,.0f}")
    print(f"{'  tokenize + write only (num_proc=2)':<46}{tokens / manifest['tokenize_seconds']:>14,.0f}")
    loader_stage = f"loader (batch {args.batch} x {args.seq_len}, prefetch)"
    print(f"{loader_stage:<46}{loader_rate:>14,.0f}")
    print(f"{'tiny model training step (fwd+bwd+AdamW)':<46}{train_rate:>14,.0f}")
    print(f"loader / training = {loader_rate / train_rate:,.0f}x (target: >= 10x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
