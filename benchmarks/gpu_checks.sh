#!/usr/bin/env bash
# Every number docs/PERF.md owes from a GPU, in one call on one lent CUDA machine (<= 9 min on an
# H100), then one table of them. Each step is time-boxed and cut to what is left of $BUDGET; a
# step that fails or times out leaves its row empty and the rest goes on. Logs and JSON go to $OUT.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_checks.sh              # on the GPU machine
#   OUT=/tmp/dry bash benchmarks/gpu_checks.sh --dry-run    # the same steps at tiny sizes on a CPU
#
# Steps (the dry run: tiny sizes, 1 rank, fp32, CUDA-only steps skipped with a line):
#   kernels   pytest -m gpu tests/test_kernels.py (Triton kernels vs references)
#   loss      benchmarks/bench_preference_loss.py at V=128,256: the log-prob kernels and the library
#             baselines (bf16 cross-entropy, TRL, Liger when importable), median of 3 runs
#   model     benchmarks/bench_model.py --preset 1b: a random-init Llama-3.2-1B-shaped model, V=128,256
#   train     benchmarks/bench_train_throughput.py on it, 2,048-token rows, zero3_gpu.json, bf16:
#             msl_ds logits / fused_linear, each with and without gradient checkpointing, against
#             transformers.Trainer with the same JSON: tokens/s, MFU, peak memory, largest micro-batch
#   gen       benchmarks/bench_generation.py on it: augment-phase generation tokens/s, gathered vs synced
#   msl       launch/train.py: a 2-stage run.method=msl run of it on the tiny world (fused_linear,
#             gradient checkpointing): stage wall times
#   train2    (2+ GPUs) the train bench on 2 ranks; skipped with a line on a 1-GPU box
#   genmode   pytest tests/test_generation_mode.py tests/test_packing.py (2-rank tests: 2+ GPUs only)
# Missing packages travel as wheels in .whl/ (installed with pip --target; the DeepSpeed launcher is
# then run as `python3 -m deepspeed.launcher.runner`, there being no `deepspeed` on PATH).
set -u
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/msl_gpu_checks}
WORK=${WORK:-$OUT/work}
BUDGET=${BUDGET:-530}  # seconds for all steps (the 9 minutes less start-up and the table)
BOX_SCALE=1           # the dry run stretches every box (a loaded CPU box, not the GPU budget)
[ $DRY = 1 ] && BOX_SCALE=4 BUDGET=${DRY_BUDGET:-1500}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTHONDONTWRITEBYTECODE=1 MSL_NO_PROGRESS=1 HF_HUB_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false
if [ $DRY = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ $DRY = 0 ] && [ "$NGPU" = 0 ]; then
  echo "no CUDA device: run with --dry-run on a CPU" >&2
  exit 2
fi
{ date -u; [ $DRY = 1 ] && echo "DRY RUN: tiny sizes on $(nproc) CPU cores; no number below measures anything" ||
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__,
'transformers', transformers.__version__)" 2>/dev/null
  $PY -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not importable"
  git rev-parse --short HEAD 2>/dev/null; } 2>&1 | tee "$OUT/env.txt"

START=$SECONDS
step() {  # step NAME SECONDS CMD...: run CMD time-boxed (cut to the budget left), log to $OUT/NAME.log
  local name=$1 secs=$(($2 * BOX_SCALE)); shift 2
  local left=$((BUDGET - (SECONDS - START)))
  [ "$secs" -gt "$left" ] && secs=$left
  if [ "$secs" -lt 10 ]; then
    echo "== $name: skipped, the ${BUDGET} s budget is spent" | tee -a "$OUT/steps.txt"
    return 1
  fi
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s (box $secs s)" | tee -a "$OUT/steps.txt"
  [ $rc -eq 0 ] || tail -15 "$OUT/$name.log"
  return $rc
}
skip() { echo "== $1: skipped, $2" | tee -a "$OUT/steps.txt"; }
: >"$OUT/steps.txt"

if [ $DRY = 1 ]; then  # tiny sizes: every script runs, nothing is measured
  SIZE=(--hidden 64 --layers 2 --heads 4 --kv-heads 2 --vocab 1024 --positions 128)
  SEQ=64 MICRO=2 STEPS=2 WARMUP=1 DTYPE=fp32 DSJ=zero3.json
  LOSS=(--cpu --tokens 128 --seq 64 --vocab 1024 --hidden 32 --dtypes float32 --runs 1 --reps 1
    --contenders matmul+kernel fused-linear)
  MSL=(train.max_steps=2 data.eval_limit=4 eval.retain=false eval.general=false pbl.samples=2 pbl.max_new_tokens=4
    pbl.subject_max_new_tokens=4 augment.max_new_tokens=4 augment.background_max_new_tokens=4 eval.max_new_tokens=4
    deepspeed.threads_per_rank=1)
else
  SIZE=(--preset 1b)
  SEQ=2048 MICRO=4 STEPS=6 WARMUP=2 DTYPE=bf16 DSJ=zero3_gpu.json
  LOSS=(--runs 3 --vocab 128256 --contenders naive triton-inplace torch-ce matmul+kernel fused-linear
    fused-linear-keep2)
  $PY -c "import trl" 2>/dev/null && LOSS+=(trl-selective)
  $PY -c "import liger_kernel" 2>/dev/null && LOSS+=(liger-ce liger-flce)
  MSL=()
fi
MODEL=$WORK/model
RUN_MSL=(ds_configs/run_cpu_tiny.yaml data.dir="$WORK/world" model.path="$MODEL" model.dtype=$DTYPE
  deepspeed.config=$DSJ run.method=msl pbl.embedder=lexical data.stages=[1,2] train.logprobs=fused_linear
  train.gradient_checkpointing=true monitor.tensorboard=false)

if [ $DRY = 0 ]; then
  step kernels 60 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py
else
  skip kernels "the Triton kernel tests need CUDA"
fi
step loss 150 $PY benchmarks/bench_preference_loss.py "${LOSS[@]}" --json "$OUT/loss.json"
step world 30 $PY launch/make_world.py --out "$WORK/world" --size tiny
step model 60 $PY benchmarks/bench_model.py --out "$MODEL" --dtype $DTYPE "${SIZE[@]}"
TRAIN=(benchmarks/bench_train_throughput.py --model-dir "$MODEL" "${SIZE[@]}" --seq $SEQ --micro $MICRO
  --steps $STEPS --warmup $WARMUP --dtype $DTYPE --ds $DSJ --set deepspeed.threads_per_rank=1)
step train 200 $PY "${TRAIN[@]}" --variants logits fused_linear logits+ckpt fused_linear+ckpt --max-micro \
  --json "$OUT/train.json"
step gen 60 $PY benchmarks/bench_generation.py --config ds_configs/run_cpu_tiny.yaml --model "$MODEL" \
  --data "$WORK/world" --set model.dtype=$DTYPE deepspeed.config=$DSJ "${MSL[@]}" --json "$OUT/gen.json"
rm -rf "$WORK/run"
step msl 150 $PY launch/train.py "${RUN_MSL[@]}" run.output_dir="$WORK/run" "${MSL[@]}" &&
  cp "$WORK/run/summary.json" "$OUT/msl_summary.json"
if [ $DRY = 0 ] && [ "$NGPU" -ge 2 ]; then
  step train2 120 $PY -m deepspeed.launcher.runner --num_gpus 2 --master_port 29563 "${TRAIN[@]}" \
    --variants fused_linear+ckpt --json "$OUT/train2.json"
  step genmode 60 $PY -m pytest -q -p no:cacheprovider tests/test_generation_mode.py tests/test_packing.py
elif [ $DRY = 0 ]; then
  skip train2 "1 GPU: the 2-rank throughput step needs 2 (each rank binds its own GPU)"
  skip genmode_2rank "1 GPU: the 2-rank generation-mode test needs 2; its 1-process tests run below"
  step genmode 60 $PY -m pytest -q -p no:cacheprovider -m "not distributed" tests/test_generation_mode.py \
    tests/test_packing.py
else
  skip train2 "dry run: 1 process"
  skip genmode "dry run: the CPU suite runs these tests"
fi
echo "== all steps: $((SECONDS - START)) s of the ${BUDGET} s budget" | tee -a "$OUT/steps.txt"
$PY benchmarks/gpu_table.py "$OUT" $([ $DRY = 1 ] && echo --dry-run) | tee "$OUT/table.md"
