"""What run 3 ran on the H200 beside the GPU suite: the micro Muon run of test_gpu_distributed under each engine
against the single process (and the single process again), printing the four largest relative differences per step.
Run from the repository root (it ran with the SETTINGS written out, the same values)."""

import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

sys.path[:0] = ["tests", "tests/gpu"]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from cuda_runs import train_on_gpu
from test_gpu_distributed import SETTINGS  # the test's micro run

root = tempfile.mkdtemp()
data = f"{root}/data"
first = train_on_gpu(data, f"{root}/single", **SETTINGS, **{"optim.name": "muon"})
jobs = {
    "single2": (0, "single"),
    "zero1": (1, "zero1"),
    "zero3": (1, "zero3"),
    "ddp": (1, "ddp"),
    "zero2": (1, "zero2"),
}


def run(name):
    nproc, engine = jobs[name]
    return train_on_gpu(data, f"{root}/{name}", nproc=nproc, **SETTINGS, **{"optim.name": "muon", "dist.name": engine})


with ThreadPoolExecutor(5) as pool:
    got = dict(zip(jobs, pool.map(run, jobs)))
for name, rec in got.items():
    for step in (1, 5, 10):
        e, g = first[step], rec[step]
        rel = {
            k: abs(g[k] - e[k]) / abs(e[k])
            for k in e
            if k.startswith(("norm/", "loss", "grad_norm", "lrm/")) and isinstance(e[k], float) and e[k]
        }
        top = sorted(rel.items(), key=lambda kv: -kv[1])[:4]
        print(name, step, "max rel", " ".join(f"{k}={v:.2e}" for k, v in top), flush=True)
