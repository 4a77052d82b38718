# hpcjobs developer and demo entry points. Every target installs what it needs.
#   make test     the whole test suite against the real local Slurm devcluster
#   make demo     the llama2-lora chain on the devcluster, two nodes, end to end (RECIPE=... another)
SHELL := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
HPCJOBS := $(VENV)/bin/hpcjobs
# torch is pinned in the same pip command as deepspeed (an sdist that asks for
# torch>=2.0): an open range would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
DEMO_DIR ?= $(CURDIR)/demo
# make demo RECIPE=qwen2-grpo (or sft-lora, llm-pretrain, seq-classification, seq2seq): any recipe `hpcjobs demo-assets --recipe` knows
RECIPE ?= llama2-lora
export HPCJOBS_DEVCLUSTER ?= $(CURDIR)/.devcluster

.PHONY: install system-deps cluster-up cluster-down test test-fast demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" deepspeed -e '.[train,test]'
	touch $@

install: $(VENV)/.installed

system-deps:
	bash scripts/install-system-deps.sh

cluster-up: install system-deps
	$(HPCJOBS) devcluster up

cluster-down:
	$(HPCJOBS) devcluster down

test: install system-deps
	$(PY) -m pytest -ra --timeout=1200 --durations=40 $(PYTEST_ARGS)

# Everything that needs neither Slurm nor the training stack.
test-fast: install
	$(PY) -m pytest -ra -m "not cluster and not train" $(PYTEST_ARGS)

demo: cluster-up
	$(HPCJOBS) demo-assets --recipe $(RECIPE) $(DEMO_DIR)
	$(HPCJOBS) submit $(RECIPE) --nodes 2 --profile local --config $(DEMO_DIR)/demo.yaml --name demo
	$(HPCJOBS) watch demo

bench: install
	$(PY) bench/bench_login_path.py

clean:
	-$(HPCJOBS) devcluster down
	rm -rf $(VENV) .devcluster $(DEMO_DIR) .pytest_cache
