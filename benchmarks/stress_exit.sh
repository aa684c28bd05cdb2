#!/usr/bin/env bash
# Exit-code stress: does any rank abort at exit (e.g. SIGABRT, "terminate called without an active
# exception") after a run that succeeded? Runs, N times each,
#   1. the 2-rank ZeRO-3 kernel check that tests/test_kernels_zero3.py launches, and
#   2. a 1-stage tiny training run on 2 ranks (deepspeed launcher, short schedule),
# and counts non-zero exits and aborts. Run it niced on a shared box:
#
#   nice -n 10 benchmarks/stress_exit.sh [N]          # N defaults to 10
#
# Environment: WORLD (default data/world_tiny) and BASE (default artifacts/base_tiny) name the tiny
# world and base model; both are built first when missing (a few minutes). KEEP=1 keeps the logs
# and run directories under $WORK (default: a temporary directory). ZERO3=0 or TRAIN=0 skips a part.
set -u
N=${1:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BIN=${BIN:-$(dirname "$(command -v python)")}
WORLD=${WORLD:-data/world_tiny}
BASE=${BASE:-artifacts/base_tiny}
WORK=${WORK:-$(mktemp -d -t msl_stress_exit.XXXXXX)}
CONFIG=ds_configs/run_cpu_tiny.yaml
export MSL_NO_PROGRESS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
mkdir -p "$WORK"

if [ "${TRAIN:-1}" = 1 ]; then
  [ -f "$WORLD/world.json" ] || "$BIN/python" launch/make_world.py --out "$WORLD" --size tiny >"$WORK/world.log" 2>&1
  [ -f "$BASE/config.json" ] || "$BIN/deepspeed" --num_gpus 2 launch/make_base.py "$CONFIG" \
    "data.dir=$WORLD" "base.out_dir=$BASE" >"$WORK/base.log" 2>&1 || { echo "base build failed: $WORK/base.log"; exit 1; }
fi

port() { "$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# one part: name, then the command; prints one line per run and a total
stress() {
  local name=$1; shift
  local fails=0 aborts=0 i rc t0 log
  for i in $(seq 1 "$N"); do
    log="$WORK/$name.$i.log"
    t0=$(date +%s)
    "$@" "$i" >"$log" 2>&1
    rc=$?
    local abort=0
    if grep -q -e "terminate called" -e "Aborted" -e "exit codes: \[.*-6" -e "exits with return code = -6" "$log"; then abort=1; fi
    [ "$rc" -ne 0 ] && fails=$((fails + 1))
    [ "$abort" -ne 0 ] && aborts=$((aborts + 1))
    echo "$name run $i: exit $rc, abort $abort, $(( $(date +%s) - t0 )) s"
  done
  echo "$name: $fails of $N runs exited non-zero, $aborts showed an abort"
  TOTAL=$((TOTAL + fails))
}

zero3() { "$BIN/python" tests/scripts/zero3_fused_head.py; }
train() {
  rm -rf "$WORK/run.$1"
  "$BIN/deepspeed" --num_gpus 2 --master_port "$(port)" launch/train.py "$CONFIG" "data.dir=$WORLD" \
    "model.path=$BASE" "run.output_dir=$WORK/run.$1" "data.stages=[1]" "train.max_steps=2" \
    "data.eval_limit=8" "eval.retain=false" "eval.general=false" "monitor.tensorboard=false" \
    "deepspeed.threads_per_rank=1"
  local rc=$?
  [ "${KEEP:-0}" = 1 ] || rm -rf "$WORK/run.$1"
  return $rc
}

TOTAL=0
[ "${ZERO3:-1}" = 1 ] && stress zero3_kernel_check zero3
[ "${TRAIN:-1}" = 1 ] && stress one_stage_run train
echo "total non-zero exits: $TOTAL (logs: $WORK)"
[ "${KEEP:-0}" = 1 ] || [ "$TOTAL" -ne 0 ] || rm -rf "$WORK"
exit $((TOTAL > 0))
