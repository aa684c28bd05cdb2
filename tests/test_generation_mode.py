"""eval.gather_max_gib: gathered vs synced generation, decided from measured free memory (auto)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import deepspeed_cmd, run, too_few_gpus

from msl_ds import generation as G
from msl_ds.config import ConfigError, load_config


def meminfo(path, kib: int):
    path.write_text(f"MemTotal:       99999999 kB\nMemFree:          1000 kB\nMemAvailable:   {kib} kB\n")
    return path


def test_mem_available_read_and_split_over_local_ranks(tmp_path, monkeypatch):
    f = meminfo(tmp_path / "meminfo", 8 * 1024 * 1024)  # 8 GiB
    assert G.mem_available_bytes(f) == 8 << 30
    monkeypatch.setattr(G, "MEMINFO", str(f))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert G.free_memory_bytes(torch.device("cpu")) == 2 << 30  # each local rank would hold a copy
    (tmp_path / "bad").write_text("MemTotal: 1 kB\n")
    with pytest.raises(RuntimeError, match="MemAvailable"):
        G.mem_available_bytes(tmp_path / "bad")


def test_budget_auto_and_number_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(G, "MEMINFO", str(meminfo(tmp_path / "m", 6 * 1024 * 1024)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    budget, why = G.gather_budget(G.GenConfig(gather_max_gib="auto", gather_headroom_gib=2.0), torch.device("cpu"))
    assert budget == pytest.approx(4.0) and "gather_headroom_gib" in why
    assert G.gather_budget(G.GenConfig(gather_max_gib="auto", gather_headroom_gib=9.0), torch.device("cpu"))[0] == 0
    assert G.gather_budget(G.GenConfig(gather_max_gib=1.5), torch.device("cpu"))[0] == 1.5
    assert G.decide_mode(1 << 30, 1.0) == "gathered" and G.decide_mode((1 << 30) + 1, 1.0) == "synced"


def test_config_keys():
    cfg = load_config(None)
    assert cfg.eval.gather_max_gib == "auto" and cfg.eval.synced_batch_size >= cfg.eval.batch_size
    assert load_config(None, ["eval.gather_max_gib=12"]).eval.gather_max_gib == 12.0
    for bad in ("eval.gather_max_gib=lots", "eval.gather_max_gib=-1", "eval.synced_batch_size=0"):
        with pytest.raises(ConfigError, match="eval."):
            load_config(None, [bad])
    gen = G.GenConfig.from_eval(cfg.eval, 0)
    assert (gen.gather_max_gib, gen.synced_batch_size) == ("auto", cfg.eval.synced_batch_size)


def test_gen_rates_per_phase():
    G._RATES.clear()
    outs = [{"ids": [1, 2, 3], "finished": True, "text": ""}] * 2
    G._count_rate("probe greedy", outs, 2.0, "gathered")
    G._count_rate("probe samples", outs, 1.0, "gathered")
    G._count_rate("stage 3 pre-eval", outs, 3.0, "synced")
    rates = G.take_gen_rates()
    assert rates == {"gen_tokens_per_s_probe": 12 / 3.0, "gen_tokens_per_s_pre_eval": 6 / 3.0}
    assert G.gen_rate_scalars({**rates, "acc": 1.0}) == {
        "perf/gen_tokens_per_s/probe": 4.0, "perf/gen_tokens_per_s/pre_eval": 2.0,
    }  # fmt: skip
    assert G.take_gen_rates() == {}


@pytest.mark.distributed
@pytest.mark.skipif(too_few_gpus(2), reason="2 ranks on a CUDA box need 2 GPUs (rank 1 binds cuda:1)")
def test_auto_mode_decided_on_rank0_for_every_rank(tmp_path):
    """Real ZeRO-3 engine on 2 gloo ranks; rank 1 sees almost no free memory: both ranks go synced."""
    out = tmp_path / "modes.json"
    small = meminfo(tmp_path / "meminfo_small", 1024)  # 1 MiB available on rank 1
    run(deepspeed_cmd("tests/scripts/gen_mode_ranks.py", str(out), str(small)), timeout=600)
    r = json.loads(out.read_text())
    assert len(r["ranks"]) == 2 and r["ranks"][0] == r["ranks"][1]
    assert r["ranks"][0] == {"rank1_small": "synced", "both_machine": "gathered", "number": "synced"}
