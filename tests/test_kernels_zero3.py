"""ZeRO-3 check of msl_ds.kernels.FusedLMHeadLogprobs on 2 CPU ranks (gloo).

Launches tests/scripts/zero3_fused_lm_head.py, which spawns 2 ranks, trains a tiny model
whose lm-head is a FusedLMHeadLogprobs under DeepSpeed ZeRO stage 3 (built both inside
``deepspeed.zero.Init`` and as a plain model partitioned by ``deepspeed.initialize``) and
compares the full gradients (``safe_get_full_grad``), the AdamW update and a second step
with a single-process nn.Linear + log_softmax computation.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed"),
]


def test_fused_lm_head_under_zero3_two_cpu_ranks():
    script = os.path.join(os.path.dirname(__file__), "scripts", "zero3_fused_lm_head.py")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("RANK", None)
    # first run may JIT-build DeepSpeed's CPU comm op (~1 min); later runs take ~20 s
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    print(out[-8000:])
    assert proc.returncode == 0, out[-8000:]
    assert "ZERO3 OK (zero_init)" in proc.stdout and "ZERO3 OK (plain)" in proc.stdout
