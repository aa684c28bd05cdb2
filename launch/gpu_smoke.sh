#!/usr/bin/env bash
# The real pipeline on one lent GPU, in one call: the tiny world, its base model, then a 2-stage
# `run.method=msl` run (probe, PBL, self-distillation, selection, training with the Triton loss
# kernel, evaluation, checkpoints) in bf16 over NCCL. Missing packages travel as wheels in .whl/
# (INSTALL_WHEELS=1; docs/PERF.md says which). Logs and summary.json go to $OUT.
#   OUT=/tmp/smoke INSTALL_WHEELS=1 bash launch/gpu_smoke.sh [extra key=value overrides for train.py]
# BASE_ARGS: extra overrides for make_base.py; DTYPE: bf16 (default) | fp32 (for a CPU dry run).
set -u
OUT=${OUT:-/tmp/msl_gpu_smoke}
WORK=${WORK:-/tmp/msl_gpu_smoke_work}
DTYPE=${DTYPE:-bf16}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore MSL_NO_PROGRESS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${INSTALL_WHEELS:-0}" = 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, deepspeed, transformers, datasets, triton
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'deepspeed', deepspeed.__version__,
      'transformers', transformers.__version__, 'datasets', datasets.__version__, 'triton', triton.__version__)" 2>&1 | tee "$OUT/versions.txt"
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || { tail -30 "$OUT/$name.log"; exit $rc; }
}
DS="python3 -m deepspeed.launcher.runner --num_gpus 1 --master_port 29561"
CFG=ds_configs/run_cpu_tiny.yaml
step world 60 python3 launch/make_world.py --out "$WORK/world" --size tiny
step base 150 $DS launch/make_base.py $CFG data.dir="$WORK/world" base.out_dir="$WORK/base" model.dtype=$DTYPE ${BASE_ARGS:-}
step train 240 $DS launch/train.py $CFG data.dir="$WORK/world" model.path="$WORK/base" model.dtype=$DTYPE \
  run.output_dir="$WORK/run" run.method=msl pbl.embedder=lexical data.stages=[1,2] data.eval_limit=40 "$@"
grep -h -i -E "nccl|bf16|stage_0[12]" "$OUT/train.log" | grep -v -i warn | head -12
cp "$WORK/run/summary.json" "$OUT/" && python3 -c "
import json; s = json.load(open('$OUT/summary.json'))
for m in s['stages']:
    print({k: v for k, v in m.items() if not isinstance(v, (dict, list))})"
