# The two commands of the README:
#   make train   runs the main job (configs/experiments/tiny_cpu.gin) on this machine
#   make test    runs the whole test suite
# Both create .venv from the requirement files when it is missing or stale.
#   make fit-check FIT_GIN=… FIT_TOPOLOGY=…   will that experiment fit on that TPU slice (compiled on this host)
#   make eval    evaluates the main job's latest checkpoint on its test set (python -m tspo_jax.evaluate)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
PYTEST_ARGS ?=
# Generated gRPC code for the retrieval service (never hand-edited, never committed).
PROTO_OUT := retrieval_service/retrieval_pb2.py retrieval_service/retrieval_pb2_grpc.py

# The main job's run directory, as its config names it (`make eval RUN_DIR=runs/other` for another run).
MAIN_JOB := configs/experiments/tiny_cpu.gin
RUN_DIR ?= $(shell sed -n "s/^RUN_DIR = '\(.*\)'$$/\1/p" $(MAIN_JOB))

.PHONY: venv dev tpu proto test train eval sft-demo compare bench fit-check clean

$(VENV)/.runtime-installed: requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps -r requirements-nodeps.txt
	PYTHONWARNINGS=ignore $(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.runtime-installed requirements-dev.txt requirements-tpu.txt
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

# libtpu: compiles for TPU topologies on any host (the fit check); on a TPU VM it also runs them.
$(VENV)/.tpu-installed: $(VENV)/.runtime-installed requirements-tpu.txt
	$(PIP) install --quiet -r requirements-tpu.txt
	touch $@

venv: $(VENV)/.runtime-installed
dev: $(VENV)/.dev-installed
tpu: $(VENV)/.tpu-installed

$(PROTO_OUT) &: retrieval_service/retrieval.proto $(VENV)/.runtime-installed
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. retrieval_service/retrieval.proto

proto: $(PROTO_OUT)

test: $(VENV)/.dev-installed proto
	$(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

train: $(VENV)/.runtime-installed proto
	$(PY) -m tspo_jax.train --gin_file=$(MAIN_JOB) $(TRAIN_ARGS)

# Everything else (model, agent limits, test set, retrieval) comes from RUN_DIR's operative config.
eval: $(VENV)/.runtime-installed proto
	@test -n "$(RUN_DIR)" || { echo "no RUN_DIR = '...' line in $(MAIN_JOB); use make eval RUN_DIR=..."; exit 2; }
	$(PY) -m tspo_jax.evaluate --model $(RUN_DIR) $(EVAL_ARGS)

# The demo policy's supervised warm start (about an hour on 2 CPU cores); `make sft-demo SHIP=1` then copies its
# export into tspo_jax/data/demo_policy (the policy `make train` starts from) with its recipe and hashes.
sft-demo: $(VENV)/.runtime-installed proto
	$(PY) -m tspo_jax.sft --gin_file=configs/experiments/sft_demo.gin $(SFT_ARGS)
	$(if $(SHIP),$(PY) -m tspo_jax.training.demo_policy --ship runs/sft_demo)

# TSPO vs GRPO vs GTPO from the demo policy on the demo world, 3 seeds each: runs/compare/{summary.json,compare.png}
compare: $(VENV)/.runtime-installed proto
	$(PY) -m tspo_jax.compare --out runs/compare --seeds 0 1 2 --parallel 2 $(COMPARE_ARGS) \
		-- --gin_file=configs/experiments/compare_demo.gin

FIT_GIN ?= configs/experiments/search_r1_qwen2_5_7b.gin
FIT_TOPOLOGY ?= v5p:2x2x2
fit-check: $(VENV)/.tpu-installed
	$(PY) -m tspo_jax.fit_check --gin_file=$(FIT_GIN) --topology=$(FIT_TOPOLOGY) $(FIT_ARGS)

bench: $(VENV)/.dev-installed proto
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(PROTO_OUT) .pytest_cache
