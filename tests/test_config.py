"""Every file in ds_configs/ loads and validates; bad keys and types fail with their names."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from msl_ds.config import (
    CONFIG_DIR,
    RENAMED,
    ConfigError,
    RunConfig,
    load_config,
    load_deepspeed_config,
    zero_stage,
)
from msl_ds.recipe import Recipe

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
    # one schedule on any cluster, gradients added and reduced in fp32 (not the bf16 of the weights)
    assert t.global_batch_size > 0 and load_deepspeed_config(cfg, 16)["train_batch_size"] == t.global_batch_size
    assert ds["data_types"]["grad_accum_dtype"] == "fp32" and ds["communication_data_type"] == "fp32"
    assert cfg.data.max_seq_len >= 1024 and t.lr <= 2e-5 and not cfg.run.keep_stage_checkpoints


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    ds = load_deepspeed_config(cfg, world_size=2)
    t = cfg.train
    assert ds["train_batch_size"] == (t.global_batch_size or t.micro_batch_size * t.grad_accum * 2)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2


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


def test_stage_0_is_not_a_run_stage():
    """Stage 0 is the base model's knowledge: a run that lists it would train it as a stage."""
    for bad in ("[0, 1, 2]", "[]"):
        with pytest.raises(ConfigError, match=r"data.stages=.*list stages >= 1.*stage 0 is the base"):
            load_config(CONFIG_DIR / "run_cpu_default.yaml", [f"data.stages={bad}"])


def test_int_accepted_for_float_but_not_bool(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("train:\n  lr: 1\n")
    assert load_config(p).train.lr == 1.0
    p.write_text("train:\n  lr: true\n")
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(p)


def test_deepspeed_hf_style_auto_values_filled(tmp_path):
    """A DeepSpeed JSON as Hugging Face users write it: "auto" everywhere, optimizer and scheduler blocks."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto"}},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                              "stage3_param_persistence_threshold": "auto"},
        "bf16": {"enabled": "auto"}, "gradient_clipping": "auto", "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    }))  # fmt: skip
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 64}))
    cfg = load_config(CONFIG_DIR / "run_cpu_default.yaml", [f"deepspeed.config={ds}", f"model.path={model}"])
    got = load_deepspeed_config(cfg, world_size=2)
    assert "optimizer" not in got and "scheduler" not in got  # msl_ds builds them from train.*
    z = got["zero_optimization"]
    assert (z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) == (
        64 * 64, int(0.9 * 64 * 64), 640,
    )  # fmt: skip
    assert got["train_batch_size"] == 16 and got["gradient_clipping"] == 1.0 and got["bf16"]["enabled"] is False


def test_deepspeed_optimizer_with_its_own_values_refused(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 2e-5}}}))
    cfg = load_config(CONFIG_DIR / "run_cpu_default.yaml", [f"deepspeed.config={ds}"])
    with pytest.raises(ConfigError, match=r"'optimizer.params.lr' is 2e-05 .*train.lr=0.0005.*set train.lr=2e-05"):
        load_deepspeed_config(cfg, world_size=1)
    ds.write_text(json.dumps({"optimizer": {"type": "Lamb"}}))
    with pytest.raises(ConfigError, match="builds AdamW"):
        load_deepspeed_config(cfg, world_size=1)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_code_defaults_are_the_reference_yaml():
    """One source of truth: a config that sets nothing gets exactly the reference run."""
    assert load_config(None).to_dict() == load_config(CONFIG_DIR / "run_cpu_default.yaml").to_dict()


def test_extends_layers_a_short_overlay(tmp_path):
    tiny = load_config(CONFIG_DIR / "run_cpu_tiny.yaml")
    ref = load_config(CONFIG_DIR / "run_cpu_default.yaml")
    assert tiny.train == ref.train and tiny.pbl == ref.pbl  # inherited
    assert (tiny.run.method, tiny.data.dir, tiny.base.train.max_steps) == ("sft", "data/world_tiny", 400)
    assert tiny.base.train.lr == ref.base.train.lr  # a nested section merges key by key
    child = tmp_path / "child.yaml"
    child.write_text("extends: run_cpu_tiny.yaml\ntrain:\n  lr: 1.0e-4\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"child.yaml:4: unknown key 'train.lrr' \(did you mean 'train.lr'\?\)"):
        load_config(child)
    child.write_text("extends: run_cpu_tiny.yaml\ntrain:\n  lr: 1.0e-4\n")
    cfg = load_config(child)
    assert cfg.train.lr == 1e-4 and cfg.run.name == "tiny" and cfg.run.output_dir == "runs/tiny"
    # an error in an extended file names that file and its line
    (tmp_path / "parent.yaml").write_text("extends: run_cpu_default.yaml\nrun:\n  name: p\n  method: nope\n")
    (tmp_path / "c.yaml").write_text("extends: parent.yaml\n")
    (tmp_path / "run_cpu_default.yaml").write_text((CONFIG_DIR / "run_cpu_default.yaml").read_text())
    with pytest.raises(ConfigError, match=r"parent.yaml:4: run.method: 'nope' is not one of"):
        load_config(tmp_path / "c.yaml")
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="'extends' loops"):
        load_config(loop)


def test_did_you_mean_and_numbers_for_strings():
    with pytest.raises(ConfigError, match=r"unknown key 'lr' \(did you mean 'train.lr'\?\)"):
        load_config(None, ["lr=1e-3"])
    with pytest.raises(ConfigError, match=r"did you mean 'pbl.samples'"):
        load_config(None, ["pbl.sample=4"])
    assert load_config(None, ["run.name=2024"]).run.name == "2024"
    # the loss weights carry one name from the YAML to the kernel; old names say the new one
    for old, new in RENAMED.items():
        hint = f"renamed: it is '{new}' now" if new else "removed"
        with pytest.raises(ConfigError, match=rf"unknown key '{old}' \({hint}\)"):
            load_config(None, [f"{old}=1"])
    cfg = load_config(None, ["pbl.np_weight=0.3", "pbl.sigmoid_beta=2"])
    lc = Recipe(cfg).loss_config()
    assert (lc.nll_weight, lc.pp_weight, lc.np_weight, lc.sigmoid_beta) == (1.0, 0.1, 0.3, 2.0)
    assert load_config(None, ["data.format=alpaca", "data.columns={question: prompt}"]).data.columns == {
        "question": "prompt"
    }
