"""Real ranks: model families under ZeRO-3, micro-batch/accumulation invariance."""

from __future__ import annotations

import json

import pytest
from conftest import deepspeed_cmd, run

pytestmark = pytest.mark.distributed


def test_model_families_under_zero3(tmp_path):
    report = tmp_path / "report.json"
    run(deepspeed_cmd("tests/scripts/families.py", str(report), str(tmp_path / "work")), timeout=600)
    r = json.loads(report.read_text())
    assert set(r) == {"llama", "qwen2", "mistral"}
    for name, e in r.items():
        assert e["partitioned"], f"{name}: weights were not partitioned as they loaded"
        assert e["losses"][-1] < 0.5 * e["losses"][0], (name, e["losses"])
        assert e["reload_max_abs_diff"] < 1e-4, (name, e["reload_max_abs_diff"])
        assert e["reload_model_type"] == name
        assert e["reload_pad_token_id"] == e["tokenizer_pad_id"] is not None
        assert e["gathered_eq_synced"], name
        assert any(a for a in e["answers"]), name
