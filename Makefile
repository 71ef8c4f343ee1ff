# `make test` and `make train` set up everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a GPU machine the same pin resolves to the CUDA build.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: install test train bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN) numpy
	# DS_BUILD_OPS=0: DeepSpeed installs as pure Python, no CUDA/C++ build.
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) scripts/bench_model.py
	$(PY) scripts/bench_data.py
	$(PY) scripts/bench_train.py
	$(PY) scripts/bench_dist.py

clean:
	rm -rf $(VENV) .pytest_cache

# The default job: prepare the default corpus if needed, then train the tiny Falcon-H1 with lrm=full on CPU
# (resumes runs/default if it was interrupted). Extra Hydra overrides: make train ARGS="optim=muon train.max_steps=100"
train: $(STAMP)
	$(PY) -m lrm_train.train $(ARGS)
