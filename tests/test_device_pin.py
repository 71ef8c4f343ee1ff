"""The CPU suite runs on CPU even on a machine with a GPU (``make test-gpu`` is the GPU suite): trainer tests would
otherwise run in bf16 on CUDA against tolerances measured in float32, and 2-rank tests would ask for a cuda:1."""

import os
import subprocess
import sys

import torch


def test_the_cpu_suite_hides_any_gpu_from_itself_and_its_subprocesses():
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    assert not torch.cuda.is_available()
    child = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True
    )
    assert child.stdout.decode().strip() == "False"
