"""The trainer's data step under torchrun: a finished folder is used, a small source is prepared by rank 0 while the
others wait on a heartbeat, a large one is refused with the exact prepare command; shards are hashed once."""

import shlex
import time
from pathlib import Path

import pytest
from runs import exit_saved_worker

from lrm_train.data import DataConfig, verify
from lrm_train.data.prepare import main as prepare_main
from lrm_train.train import build
from lrm_train.train.config import RunConfig
from tests.data.conftest import write_corpus


class Rank:
    """One rank of a ``world_size`` run, alone: collectives answer with this rank's own values, or with ``beats``
    (rank 0's heartbeats) and ``main_outcome`` (rank 0's result) for a waiting rank."""

    def __init__(self, rank=0, world_size=2, beats=(), main_outcome=None):
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.sent, self.beats, self.main_outcome = [], list(beats), main_outcome

    def max_over_ranks(self, values):
        self.sent.append(values[0])
        return [self.beats.pop(0)] if self.beats else values

    def all_gather_object(self, obj):
        return [self.main_outcome or obj] * self.world_size


@pytest.fixture
def run_cfg(tmp_path):
    source = write_corpus(tmp_path / "corpus")
    data = DataConfig(name="small", source=str(source), out_root=str(tmp_path / "out"), vocab_size=400, num_proc=1)
    data.seq_len, data.val_windows, data.val_fraction = 16, 4, 0.2
    return RunConfig(data=data)


def test_a_large_unprepared_source_is_refused_with_the_command_that_prepares_it(run_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(build, "IN_JOB_PREPARE_BYTES", 1000)
    with pytest.raises(ValueError) as refused:
        build.prepare_data(run_cfg, Rank())
    line = str(refused.value)
    assert "\n" not in line and "a distributed run prepares only sources up to 0 MiB; prepare it first: " in line
    assert not (tmp_path / "out").exists()  # nothing was prepared inside the job
    command = shlex.split(line.split("prepare it first: ")[1])
    assert command[:3] == ["python", "-m", "lrm_train.data.prepare"]
    assert prepare_main(command[3:]) == 0  # the command as given prepares exactly the folder the run looks for
    data = build.prepare_data(run_cfg, Rank())
    assert data.folder.parent == tmp_path / "out"


def test_a_small_source_is_prepared_in_the_job_while_the_others_wait_on_a_heartbeat(run_cfg, monkeypatch):
    monkeypatch.setattr(build, "HEARTBEAT_SECONDS", 0.01)
    real_prepare = build.prepare

    def slow_prepare(cfg):
        time.sleep(0.2)
        return real_prepare(cfg)

    monkeypatch.setattr(build, "prepare", slow_prepare)
    main = Rank()
    data = build.prepare_data(run_cfg, main)
    assert data.splits["train"].num_tokens > 0
    assert main.sent.count(1) >= 3 and main.sent[-1] == 0  # beats while preparing, then "done"
    waiting = Rank(rank=1, beats=[1, 1, 1, 0], main_outcome=("ok", str(data.folder)))
    build.prepare_data(run_cfg, waiting)
    assert waiting.sent == [0, 0, 0, 0]  # it waited through three beats, never in one long collective


def test_opening_the_data_again_hashes_no_shard(run_cfg, monkeypatch):
    hashed = []  # verify is the only module that hashes shards: the loader checks sizes only
    real = verify.sha256_file
    monkeypatch.setattr(verify, "sha256_file", lambda path: hashed.append(path) or real(path))
    data = build.prepare_data(run_cfg, Rank(world_size=1))
    assert hashed == []  # prepare hashed the shards as it wrote them, and stamped them
    shard = data.folder / "train_00000.bin"
    shard.touch()  # a changed stamp: hashed once, then trusted again
    build.prepare_data(run_cfg, Rank(world_size=1))
    build.prepare_data(run_cfg, Rank(world_size=1))
    assert hashed == [shard]


def test_data_part_is_refused_by_the_trainer(run_cfg):
    run_cfg.data.num_parts, run_cfg.data.part = 2, 1
    with pytest.raises(ValueError, match="data.part=1 is for python -m lrm_train.data.prepare only"):
        build.prepare_data(run_cfg, Rank(world_size=1))


def _rank_worker(rank, folder, data_settings):
    import torch
    import torch.distributed as dist

    from lrm_train.distributed.engine import DistConfig, Engine, LaunchedProcessGroup

    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=2)
    cpu = torch.device("cpu")
    engine = Engine(DistConfig(name="ddp"), LaunchedProcessGroup(DistConfig(name="ddp"), cpu), device=cpu)
    beats, real_max = [], engine.max_over_ranks
    engine.max_over_ranks = lambda values: beats.append(real_max(values)[0]) or [beats[-1]]
    build.HEARTBEAT_SECONDS = 0.05
    real_prepare = build.prepare

    def slow_prepare(cfg):
        time.sleep(1.0)  # twenty beats
        return real_prepare(cfg)

    build.prepare = slow_prepare
    data = build.prepare_data(RunConfig(data=DataConfig(**data_settings)), engine)
    with open(f"{folder}/rank{rank}", "w") as f:
        f.write(f"{data.folder} {beats.count(1)}")
    dist.destroy_process_group()
    exit_saved_worker()


@pytest.mark.multiprocess
def test_two_ranks_over_gloo_wait_on_the_heartbeat_and_open_the_same_folder(run_cfg, tmp_path):
    import dataclasses

    import torch.multiprocessing as mp

    settings = dataclasses.asdict(run_cfg.data)
    mp.start_processes(_rank_worker, args=(str(tmp_path), settings), nprocs=2, start_method="spawn")
    (folder0, beats0), (folder1, beats1) = [(tmp_path / f"rank{rank}").read_text().split() for rank in (0, 1)]
    assert folder0 == folder1 and Path(folder0).parent == tmp_path / "out"
    assert (
        int(beats0) >= 5 and int(beats1) >= 5
    )  # rank 1 saw rank 0's beats while it prepared, each wait a short collective
