#!/usr/bin/env bash
# Every GPU check of msl_ds.kernels in one call on a lent CUDA machine (see docs/PERF.md):
# the gpu-marked tests, the issue-4 benchmark, the launch/chunk sweep, and Liger-Kernel's
# fused-linear DPO when its wheel was carried in .whl/. Each step is time-boxed; logs go to $OUT.
#   OUT=/tmp/gpu bash benchmarks/gpu_checks.sh
set -u
OUT=${OUT:-/tmp/msl_gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTHONDONTWRITEBYTECODE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site
fi
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$OUT/gpu.txt"
step() {  # step NAME SECONDS CMD...: run CMD with a time box, log to $OUT/NAME.log
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0)) s"
}
step pytest_gpu 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py
tail -4 "$OUT/pytest_gpu.log"
python3 - <<'PY' 2>&1 | tee -a "$OUT/gpu.txt"
import torch
from msl_ds.kernels import fused_linear as fl
h = torch.randn(1, 64, 32, device="cuda").bfloat16().requires_grad_()
w = torch.randn(300, 32, device="cuda").bfloat16().requires_grad_()
lp, _ = fl.fused_linear_sequence_logprobs(h, w, torch.randint(0, 300, (1, 64), device="cuda"),
                                          torch.ones(1, 64, dtype=torch.bool, device="cuda"), chunk_tokens=16)
lp.sum().backward()
print("addmm(out_dtype=float32) accumulation used:", fl._ADDMM_OUT_DTYPE)
PY
step bench 240 python3 benchmarks/bench_preference_loss.py --profile --json "$OUT/bench.json" \
  --contenders naive chunked chunked-inplace triton triton-inplace naive-linear matmul+kernel fused-linear \
  fused-linear-keep1 fused-linear-keep2 fused-linear-torch
grep -v '^{' "$OUT/bench.log" | tail -30
step sweep 150 python3 benchmarks/sweep_kernel_blocks.py --reps 5
cat "$OUT/sweep.log"
if python3 -c "import liger_kernel" 2>/dev/null; then
  step liger 120 python3 benchmarks/bench_preference_loss.py --contenders naive-linear fused-linear liger-dpo
  grep -v '^{' "$OUT/liger.log" | tail -8
fi
# library baselines of the loss bench on the GPU (median of 3 runs, min-max): bf16 cross-entropy,
# TRL's selective_log_softmax (when trl is importable), Liger's cross-entropy and fused-linear CE
baselines=(naive chunked-inplace triton-inplace torch-ce naive-linear fused-linear)
python3 -c "import trl" 2>/dev/null && baselines+=(trl-selective)
python3 -c "import liger_kernel" 2>/dev/null && baselines+=(liger-ce liger-flce)
step baselines 300 python3 benchmarks/bench_preference_loss.py --runs 3 --json "$OUT/baselines.json" \
  --contenders "${baselines[@]}"
grep -v '^{' "$OUT/baselines.log" | tail -20
# generation under ZeRO-3 with eval.gather_max_gib=auto and synced batches, and padding-free packing:
# the unit and 2-rank tests run on CUDA too (nccl ranks are not needed: the decision is per process group)
step gen_mode 200 python3 -m pytest -q -p no:cacheprovider tests/test_generation_mode.py tests/test_packing.py
tail -4 "$OUT/gen_mode.log"
