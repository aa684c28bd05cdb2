"""Filled forwards on 2 real ZeRO-3 ranks of the tiny world: the same training as micro-batches."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_CONFIG, deepspeed_cmd, run

pytestmark = pytest.mark.distributed


def test_filled_forwards_train_like_micro_batches(tiny_world, tiny_base, tmp_path):
    """train.global_batch_size=16 with forwards filled up to a token budget, against today's
    batching (4 groups x 2 accumulation steps x 2 ranks): the same plan; fewer forwards with a
    roomy budget, more (and filler forwards) with a tight one; the same per-step losses to 1e-5
    and the same weights after 4 steps (fp32, summed in another order)."""
    out = tmp_path / "fill.json"
    args = [str(out), str(TINY_CONFIG), f"data.dir={tiny_world}", f"model.path={tiny_base}"]
    run(deepspeed_cmd("tests/scripts/fill_forwards_ranks.py", *args, "deepspeed.threads_per_rank=1", "train.lr=1e-3"))
    got = json.loads(out.read_text())
    micro, filled, tight = got["micro"], got["filled"], got["tight"]
    assert got["grouped"] > 10  # groups with candidates, not only single rows
    assert micro["plan"] == filled["plan"] == tight["plan"] and all(len(s) == 16 for s in micro["plan"])
    assert micro["forwards"] == 4 * 2  # rank 0: 2 micro-batches per step
    assert 4 <= filled["forwards"] < micro["forwards"]  # filled: fewer, larger forwards
    assert tight["forwards"] > micro["forwards"] and tight["fillers"] > 0  # cut small, ranks padded with fillers
    assert micro["losses"][0] != pytest.approx(micro["losses"][-1], rel=1e-3)  # the weights did move
    for cut in (filled, tight):
        assert len(cut["losses"]) == 4
        assert cut["losses"] == pytest.approx(micro["losses"], rel=1e-5)
        assert cut["max_weight_diff"] < 1e-5
