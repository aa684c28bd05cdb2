"""Real ranks: model families (and chat-template families) under ZeRO-3."""

from __future__ import annotations

import json

import pytest
from conftest import deepspeed_cmd, run

pytestmark = pytest.mark.distributed


def test_model_families_under_zero3(tmp_path):
    report = tmp_path / "report.json"
    run(deepspeed_cmd("tests/scripts/families.py", str(report), str(tmp_path / "work")), timeout=600)
    r = json.loads(report.read_text())
    chat = r.pop("chat")
    assert set(r) == {"llama", "qwen2", "mistral"}
    for name, e in r.items():
        assert e["partitioned"], f"{name}: weights were not partitioned as they loaded"
        assert e["losses"][-1] < 0.5 * e["losses"][0], (name, e["losses"])
        assert e["reload_max_abs_diff"] < 1e-4, (name, e["reload_max_abs_diff"])
        assert e["reload_model_type"] == name
        assert e["reload_pad_token_id"] == e["tokenizer_pad_id"] is not None
        assert e["gathered_eq_synced"], name
        assert any(a for a in e["answers"]), name
    assert set(chat) == {"llama3", "qwen2", "gemma"}
    for name, e in chat.items():
        assert e["losses"][-1] < 0.7 * e["losses"][0], (name, e["losses"])  # its template's rows train
        assert e["gathered_eq_synced"] and e["generated_tokens"] > 0, name
        assert e["copy_reused"] and e["copy_rebuilt_after_step"], name
        assert e["copy_param_dtypes"] == e["engine_param_dtypes"] and e["copy_buffers_match"], (name, e)
        assert e["copy_logits_max_abs_diff"] == 0.0, (name, e)  # bit for bit the engine's model
    llama3 = chat["llama3"]  # bf16, llama3 RoPE scaling, prompts far out in its 2048 positions
    assert llama3["copy_param_dtypes"] == ["torch.bfloat16"] and llama3["inv_freq_dtype"] == "torch.float32"
    assert 1000 < llama3["prompt_tokens"] < 2000, llama3["prompt_tokens"]
