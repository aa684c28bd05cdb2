"""train.logprobs=fused_linear on its production path under ZeRO-3, on 2 CPU ranks (gloo).

Launches tests/scripts/zero3_fused_head.py, which spawns 2 ranks. Each builds its engines as a run
does (``build_engine``: a tiny Hugging Face Llama loaded partitioned, gradient checkpointing,
``zero3.json``) and takes the answer log-probs through ``AnswerLogprobs``, which installs the fused
head on the lm-head (``install_fused_head``) and checks it on the first batch. For tied and untied
embeddings in fp32 and bf16, the log-probs, every parameter's full gradient
(``safe_get_full_grad``) over two optimizer steps and the parameters after them must equal the
``train.logprobs=logits`` run's; a model whose forward multiplies its logits must be refused by the
first-batch check on both ranks, naming ``train.logprobs=logits``.
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


def test_fused_head_gradients_equal_logits_path_on_two_zero3_ranks():
    script = os.path.join(os.path.dirname(__file__), "scripts", "zero3_fused_head.py")
    env = dict(os.environ, PYTHONWARNINGS="ignore", MSL_NO_PROGRESS="1")
    env.pop("RANK", None)
    # ~1 min on 2 cores (8 engines of a tiny Llama and the refused one)
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    print(out[-8000:])
    assert proc.returncode == 0, out[-8000:]
    for case in ("untied fp32", "untied bf16", "tied fp32", "tied bf16"):
        assert f"[rank 0] {case}: ok" in proc.stdout, case
    assert "scaled head refused" in proc.stdout and "FUSED HEAD OK" in proc.stdout
