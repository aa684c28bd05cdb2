"""Every file in ds_configs/ loads and validates; bad keys and types fail with their names."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from msl_ds.config import CONFIG_DIR, ConfigError, RunConfig, load_config, load_deepspeed_config, zero_stage

RUN_CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
DS_CONFIGS = sorted(CONFIG_DIR.glob("*.json"))


def test_ds_configs_exist():
    names = {p.name for p in DS_CONFIGS}
    assert {"zero3.json", "zero3_offload.json", "zero2.json"} <= names
    assert {"run_cpu_default.yaml", "run_gpu_8b.yaml"} <= {p.name for p in RUN_CONFIGS}
    assert "zero3_gpu.json" in names


def test_gpu_configs_are_gpu_shaped():
    """The 8B run: bf16 through ZeRO-3 on GPUs, fused lm-head, checkpointing, a token budget."""
    cfg = load_config(CONFIG_DIR / "run_gpu_8b.yaml")
    ds = load_deepspeed_config(cfg, world_size=8)
    z = ds["zero_optimization"]
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and cfg.deepspeed.backend == "nccl"
    assert z["stage"] == 3 and z["overlap_comm"] and z["zero_hpz_partition_size"] >= 1
    t = cfg.train
    assert t.logprobs == "fused_linear" and t.gradient_checkpointing and t.max_tokens_per_micro_batch > 0
    assert cfg.data.max_seq_len >= 1024 and t.lr <= 2e-5 and not cfg.run.keep_stage_checkpoints


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    ds = load_deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 2


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_config_loads(path: Path):
    cfg = load_config(CONFIG_DIR / "run_cpu_default.yaml", [f"deepspeed.config={path.name}"])
    ds = load_deepspeed_config(cfg, world_size=2)
    assert zero_stage(ds) in (2, 3)
    assert ds["gradient_accumulation_steps"] == cfg.train.grad_accum
    assert ds["gradient_clipping"] == cfg.train.grad_clip
    # DeepSpeed's own schema (extra keys forbidden): a misspelt setting fails here, not on a cluster
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    DeepSpeedZeroConfig(**ds["zero_optimization"])
    if "offload" in path.name:
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"


def _keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        if f.metadata.get("internal"):
            continue
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from _keys(v, prefix + f.name + ".")
        else:
            yield prefix + f.name


def test_default_config_writes_and_comments_every_key():
    """The default file spells out every setting (with its comment), so it is the reference."""
    path = CONFIG_DIR / "run_cpu_default.yaml"
    text = path.read_text()
    cfg = load_config(path)
    lines = {}
    import yaml

    node = yaml.compose(text)

    def walk(n, prefix):
        for k, v in n.value:
            key = prefix + k.value
            lines[key] = k.start_mark.line
            if isinstance(v, yaml.MappingNode) and key != "base.arch":
                walk(v, key + ".")

    walk(node, "")
    src = text.splitlines()
    for key in _keys(cfg):
        assert key in lines, f"{key} missing from {path.name}"
        line = src[lines[key]]
        section = key.rsplit(".", 1)[0] if "." in key else key
        commented = "#" in line or key.startswith("skills.") and section == "skills"
        assert commented or key.startswith("base.train."), f"{key} has no comment in {path.name}: {line!r}"


def test_unknown_section(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"run.yaml:1: unknown key 'trian'"):
        load_config(p)


def test_literal_checked(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("run:\n  method: magic\n")
    with pytest.raises(ConfigError, match="run.method"):
        load_config(p)


def test_overrides_apply_and_are_checked():
    cfg = load_config(CONFIG_DIR / "run_cpu_default.yaml", ["train.lr=3e-4", "data.stages=[1, 2]", "run.method=replay"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.stages == [1, 2]
    assert cfg.run.method == "replay"
    with pytest.raises(ConfigError, match="command line override train.nope"):
        load_config(CONFIG_DIR / "run_cpu_default.yaml", ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(CONFIG_DIR / "run_cpu_default.yaml", ["train.lr"])


def test_int_accepted_for_float_but_not_bool(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("train:\n  lr: 1\n")
    assert load_config(p).train.lr == 1.0
    p.write_text("train:\n  lr: true\n")
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(p)


def test_deepspeed_optimizer_section_refused(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    cfg = load_config(CONFIG_DIR / "run_cpu_default.yaml", [f"deepspeed.config={ds}"])
    with pytest.raises(ConfigError, match="optimizer"):
        load_deepspeed_config(cfg, world_size=1)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
