"""The memory levers at work in a real run: train.logprobs=fused_linear with gradient checkpointing.

One launch (stages 1-2 of the tiny world, method msl, 2 ranks, ZeRO-3) compared with the session's
``msl_run`` (the same run on the logits path without checkpointing): the answer log-probs from
hidden states through the fused lm-head, recomputed activations, and nothing else may change.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import deepspeed_cmd, msl_args, run, stable

pytestmark = pytest.mark.slow  # one more 2-rank msl launch (~3 min on 2 cores)


def test_fused_linear_run_matches_logits_run(msl_run, tiny_world, tiny_base, tmp_path):
    out = tmp_path / "fused"
    proc = run(
        deepspeed_cmd(
            "launch/train.py",
            *msl_args(
                tiny_world,
                tiny_base,
                out,
                "train.logprobs=fused_linear",
                "train.gradient_checkpointing=true",
                "run.keep_stage_checkpoints=true",
            ),
        )
    )
    log = proc.stdout + proc.stderr
    assert "answer log-probs: fused_linear (train.logprobs=fused_linear)" in log
    assert "gradient checkpointing on" in log
    for s in ("stage_01", "stage_02"):  # kept on request, pointing at the stage's end
        assert (
            json.loads((out / s / "ckpt" / "LATEST.json").read_text())["step"]
            == stable(out)[int(s[-1]) - 1]["train_steps"]
        )
    assert_close_metrics(stable(msl_run), stable(out))
    # the reference log-probs of the probe went through the fused path too, and agree
    for s in ("stage_01", "stage_02"):
        ref = [r["ref_logp"] for r in _jsonl(msl_run / s / "probe.jsonl")]
        got = [r["ref_logp"] for r in _jsonl(out / s / "probe.jsonl")]
        assert got == pytest.approx(ref, rel=1e-4, abs=1e-4)


def assert_close_metrics(a, b):
    """Two 2-stage runs' metrics: fp32 sums in another order, so floats to 1e-4 relative, the rest equal."""
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float) and math.isnan(x[k]):
                assert math.isnan(y[k]), (x["stage"], k)
            elif isinstance(x[k], float):
                assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (x["stage"], k, x[k], y[k])
            else:
                assert x[k] == y[k], (x["stage"], k)


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_packed_run_matches_padded_run(msl_run, tiny_world, tiny_base, tmp_path):
    """train.packing=true (every forward's rows in one sequence, no padding) on 2 ranks: the same
    stage metrics as the padded session run, to fp32 summation order."""
    out = tmp_path / "packed"
    run(deepspeed_cmd("launch/train.py", *msl_args(tiny_world, tiny_base, out, "train.packing=true")))
    assert_close_metrics(stable(msl_run), stable(out))
