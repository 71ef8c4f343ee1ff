"""A run on a weighted mixture (``data.mixture``): per-source shares and validation losses, and its errors.

The resume checks (1 and 2 ranks) are in test_resume.py."""

from types import SimpleNamespace

import numpy as np
import pytest
from runs import as_args, cli, mixture, overrides, records, run_config

from lrm_train.data import TokenData
from lrm_train.data.mixture import MixtureLoader
from lrm_train.data.prepare import prepare
from lrm_train.train import train
from lrm_train.train.callbacks import MixtureShares, StepResult


def test_a_mixture_run_logs_shares_and_validation_per_source(data_root, tmp_path):
    train(run_config(data_root, tmp_path, **mixture(data_root)))
    got = records(tmp_path)
    for step, record in got.items():  # logged every step (train.log_every=1), counted from step 1
        rows = 4 * step  # micro batch 4, one rank
        assert record["data/share/shakespeare"] + record["data/share/plays"] == pytest.approx(1)
        assert abs(record["data/share/plays"] * rows - 0.75 * rows) <= 1  # a quota: within a row of the weight
    for step in (4, 8):  # train.eval_every=4: val_loss is the mixture-weighted mean of the sources'
        record = got[step]
        weighted = 0.25 * record["val_loss/shakespeare"] + 0.75 * record["val_loss/plays"]
        assert record["val_loss"] == pytest.approx(weighted, rel=1e-12)
        assert record["val_loss/shakespeare"] != record["val_loss/plays"]
    assert "val_loss/plays" not in got[3]


def test_shares_count_the_rows_each_rank_trains_on(data_root):
    """During a batch ramp a step trains each rank's first micro-batches only: those rows are the ones counted."""
    folder = TokenData(prepare(run_config(data_root, "unused").data))
    splits = {"a": folder.splits["train"], "b": folder.splits["val"]}
    loader = MixtureLoader(splits, [1.0, 2.0], seq_len=32, global_batch=12, world_size=2, prefetch=0)
    shares = MixtureShares(every=1, seq_len=32)
    trainer = SimpleNamespace(components=SimpleNamespace(loader=loader), engine=SimpleNamespace(world_size=2))
    shares.setup(trainer)
    sources = loader.source_ids(0)
    for trained_per_rank in (2, 6):
        shares.tokens = dict.fromkeys(shares.tokens, 0)
        step = StepResult(1, None, None, None, None, 0.0, 2 * trained_per_rank * 32, 0.0, False)
        shares.on_step(trainer, step)
        rows = np.concatenate([sources[:trained_per_rank], sources[6 : 6 + trained_per_rank]])
        assert [shares.tokens["a"] // 32, shares.tokens["b"] // 32] == np.bincount(rows, minlength=2).tolist()
        assert step.metrics["data/share/a"] == shares.tokens["a"] / (2 * trained_per_rank * 32)


def test_a_folder_with_another_tokenizer_is_one_error_line(data_root, tmp_path):
    default = prepare(run_config(data_root, "unused").data)
    plays = mixture(data_root)["data.mixture"].split("source:'")[1].split("'")[0]
    alien = prepare(run_config(data_root, "unused", **{"data.source": plays, "data.vocab_size": 300}).data)
    bad = {"data.mixture": f"[{{path:'{default}'}},{{path:'{alien}',name:alien}}]"}
    done = cli(as_args(overrides(data_root, tmp_path, **bad)))
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and f"source alien ({alien}) has another tokenizer" in errors[0], done.stderr[-2000:]


def test_a_missing_folder_is_named(data_root, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=f"{missing}/manifest.json: no such file"):
        train(run_config(data_root, tmp_path, **{"data.mixture": f"[{{source:shakespeare}},{{path:'{missing}'}}]"}))
