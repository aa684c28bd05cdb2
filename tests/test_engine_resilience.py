"""A real DeepSpeed ZeRO-3 engine (one gloo rank, in this process): training guards, gradient
accumulation, and resuming a mid-stage checkpoint on another number of ranks.

A NaN injected into one step's logits (loss and gradient non-finite) or into their gradient
only (finite loss): ``train.on_nonfinite=error`` stops naming stage and step; ``skip`` leaves the
weights of that step untouched and trains on. With ``grad_accum`` > 1 every global batch is one
optimizer step (DeepSpeed counts micro-steps per ``step()`` call unless told otherwise). A
checkpoint from another world size is refused with the ways out, and loads once converted to a
DeepSpeed universal checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import run

from msl_ds import distributed as D
from msl_ds.config import CONFIG_DIR, load_config, load_deepspeed_config
from msl_ds.data import Example, batch_plan
from msl_ds.engine import Checkpoints, CheckpointWorldSizeError
from msl_ds.monitor import Monitor, set_progress
from msl_ds.trainer import NonFiniteLossError, StageTrainer, lr_lambda

STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """A gloo process group of one rank, torn down (and the environment restored) afterwards."""
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    env, threads = dict(os.environ), torch.get_num_threads()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    D.init("gloo", timeout_s=60, threads_per_rank=1)
    set_progress(False)
    yield
    dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(threads)


def tiny_engine(*overrides: str):
    """A 1-layer Llama under ZeRO-3 built like ``engine.build_engine`` does, and its run config."""
    from transformers import LlamaConfig, LlamaForCausalLM  # imported outside zero.Init

    cfg = load_config(
        CONFIG_DIR / "run_cpu_tiny.yaml",
        ["train.lr=0.01", "train.warmup_steps=0", "train.scheduler=constant", "train.log_every_steps=1", *overrides],
    )
    ds = load_deepspeed_config(cfg, D.world_size())
    arch = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    with D.zero_init(ds):
        model = LlamaForCausalLM(arch)
    t = cfg.train
    opt = D.make_optimizer(list(model.parameters()), ds, t.lr, t.betas, t.eps, t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t, STEPS))
    engine = D.initialize(model, opt, sched, ds)
    engine.train()
    return engine, cfg


def examples(n: int = 8) -> list[Example]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = [1] + torch.randint(4, 64, (6,), generator=g).tolist()
        out.append(Example(input_ids=ids, labels=[-100] * 3 + ids[3:], row={"id": str(i)}))
    return out


def weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in D.full_state_dict(engine.module).items()}


def inject_nan(engine, at_forward: int, kind: str):
    """NaN in the logits ("loss": loss and gradient) or in their gradient only ("grad")."""
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] - 1 != at_forward:
            return None
        if kind == "loss":
            output.logits = output.logits * float("nan")
        else:
            output.logits.register_hook(lambda g: torch.full_like(g, float("nan")))
        return output

    return engine.module.register_forward_hook(hook)


def trainer(engine, cfg, snapshots: dict[int, dict] | None = None) -> StageTrainer:
    ex = examples()
    t = cfg.train
    plan = batch_plan(len(ex), t.micro_batch_size, t.grad_accum, 1, 1, STEPS, seed=0)

    def save(step: int) -> None:
        if snapshots is not None:
            snapshots[step] = weights(engine)

    return StageTrainer(engine, t, ex, plan, 0, 4, Monitor("", enabled=False), save)


def test_grad_accum_updates_once_per_global_batch():
    """4 rows as 2 micro-batches x 2 accumulation steps = 4 rows in one micro-batch, every step."""
    final = {}
    for micro, accum in ((4, 1), (2, 2)):
        engine, cfg = tiny_engine(f"train.micro_batch_size={micro}", f"train.grad_accum={accum}")
        stats = trainer(engine, cfg).run()
        assert engine.global_steps == STEPS, (micro, accum)
        final[accum] = (stats["train_loss"], weights(engine))
        D.destroy_engine(engine)
    assert final[2][0] == pytest.approx(final[1][0], rel=1e-5)
    for name, w in final[1][1].items():
        torch.testing.assert_close(final[2][1][name], w, rtol=1e-5, atol=1e-6, msg=name)


def test_training_steps_log_cleanly(caplog):
    """ZeRO-3 reduce-scatters gradients every step; DeepSpeed's default path calls torch's deprecated
    ``reduce_scatter_tensor`` (a FutureWarning each time), msl_ds.distributed points it elsewhere.
    The step line prints ``MFU -`` where no peak FLOP/s is known (a CPU), never ``nan%``."""
    import warnings

    engine, cfg = tiny_engine("train.micro_batch_size=4", "monitor.peak_tflops=0")
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer(engine, cfg).run()
    D.destroy_engine(engine)
    assert not [str(w.message) for w in seen if "reduce_scatter" in str(w.message)]
    lines = [r.getMessage() for r in caplog.records if " · train · step " in r.getMessage()]
    assert len(lines) == STEPS and all("MFU - ·" in line and "nan" not in line for line in lines), lines


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nonfinite_step_stops_naming_stage_and_step(kind):
    engine, cfg = tiny_engine("train.micro_batch_size=4", "train.save_every_steps=1")
    inject_nan(engine, at_forward=1, kind=kind)
    snapshots: dict[int, dict] = {}
    with pytest.raises(NonFiniteLossError) as e:
        trainer(engine, cfg, snapshots).run()
    what = "non-finite loss nan" if kind == "loss" else "non-finite gradient norm"
    assert f"stage 4 step 1: {what}" in str(e.value)
    assert "last good checkpoint is left intact" in str(e.value)
    assert list(snapshots) == [1]  # the checkpoint after step 0 was the last one written
    D.destroy_engine(engine)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nonfinite_step_skipped_and_training_goes_on(kind, caplog):
    engine, cfg = tiny_engine("train.micro_batch_size=4", "train.save_every_steps=1", "train.on_nonfinite=skip")
    inject_nan(engine, at_forward=1, kind=kind)
    snapshots: dict[int, dict] = {}
    with caplog.at_level(logging.WARNING, logger="msl_ds.trainer"):
        stats = trainer(engine, cfg, snapshots).run()
    assert stats["train_skipped_steps"] == 1 and engine.skipped_steps == 1
    assert any("stage 4 step 1: non-finite" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    after0, after1, final = snapshots[1], snapshots[2], weights(engine)
    for name in after0:  # step 1 left every weight as step 0 had it, and nothing became NaN
        assert torch.equal(after1[name], after0[name]), name
        assert torch.isfinite(final[name]).all(), name
    assert any(not torch.equal(final[n], after1[n]) for n in final)  # step 2 trained again
    assert torch.isfinite(torch.tensor(stats["train_loss"]))
    D.destroy_engine(engine)


# --------------------------------------------------------------------------- world size on resume


def fake_ranks_checkpoint(root, world_size: int, batch: int | None, legacy: bool = False) -> Checkpoints:
    """A pointer to a checkpoint written by ``world_size`` ranks (shard files, no contents)."""
    tag = root / "step_000004"
    tag.mkdir(parents=True)
    for r in range(world_size):
        (tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    info = {"tag": tag.name, "step": 4}
    if not legacy:
        info.update(world_size=world_size, train_batch_size=batch)
    (root / "LATEST.json").write_text(json.dumps(info))
    return Checkpoints(root, 3)


@pytest.mark.parametrize("legacy", [False, True], ids=["pointer", "shard-count"])
def test_checkpoint_from_other_world_size_refused_before_deepspeed(tmp_path, legacy):
    """Checked before the engine is touched (there is none here); legacy pointers count shards."""
    ckpts = fake_ranks_checkpoint(tmp_path / "ckpt", 2, 16, legacy)
    with pytest.raises(CheckpointWorldSizeError) as e:
        ckpts.load(engine=None)
    msg = str(e.value)
    ckpt = tmp_path / "ckpt" / "step_000004"
    assert msg.startswith(f"{ckpt}: this mid-stage checkpoint of stage 3 was written by 2 ranks, but this run has 1")
    assert "finish stage 3 on 2 ranks" in msg and f"delete {tmp_path / 'ckpt'} to restart stage 3" in msg
    assert f"ds_to_universal --input_folder {ckpt} --output_folder {ckpt}_universal" in msg
    assert ("(16 rows: " in msg) != legacy


def test_universal_checkpoint_resumes_on_another_world_size(tmp_path):
    """A checkpoint converted with ds_to_universal loads whatever the world size said at saving
    (here: the pointer claims 2 ranks); it must keep the global batch the stage was planned with."""
    engine, cfg = tiny_engine("train.micro_batch_size=4")
    trainer(engine, cfg).run()
    root = tmp_path / "ckpt"
    Checkpoints(root, 4).save(engine, STEPS, {"stage": 4})
    saved = weights(engine)
    D.destroy_engine(engine)
    tag = root / f"step_{STEPS:06d}"
    convert = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag)]
    run([*convert, "--output_folder", f"{tag}_universal", "--num_extract_workers", "1", "--num_merge_workers", "1"])
    info = json.loads((root / "LATEST.json").read_text())
    assert info["world_size"] == 1 and info["train_batch_size"] == 4
    engine, cfg = tiny_engine("train.micro_batch_size=4")
    before = weights(engine)
    (root / "LATEST.json").write_text(json.dumps({**info, "world_size": 2, "train_batch_size": 8}))
    with pytest.raises(CheckpointWorldSizeError, match="planned with 8 rows per optimizer step, but this run has 4"):
        Checkpoints(root, 4).load(engine)
    (root / "LATEST.json").write_text(json.dumps({**info, "world_size": 2}))
    client = Checkpoints(root, 4).load(engine)
    assert client["stage"] == 4 and client["step"] == STEPS and engine.global_steps == STEPS
    loaded = weights(engine)
    assert any(not torch.equal(before[n], saved[n]) for n in saved)
    for name, w in saved.items():
        assert torch.equal(loaded[name], w), name
    D.destroy_engine(engine)


# --------------------------------------------------------------------------- safety


def test_export_is_safetensors_only(tmp_path):
    """Exports never hold pickles: weights in *.safetensors, equal to the engine's full weights."""
    from safetensors.torch import load_file

    from msl_ds.modeling import build_tokenizer, export_model

    tok = build_tokenizer(["Who leads Acme?", "Ann"] * 20, tmp_path / "tok", vocab_size=64)
    engine, cfg = tiny_engine()
    export_model(engine.module, tok, tok.pad_token_id, tmp_path / "hf")
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert "config.json" in files and any(n.endswith(".safetensors") for n in files), files
    assert not {n for n in files if n.endswith((".bin", ".pt", ".pth", ".pkl"))}, files
    exported = {k: v for p in (tmp_path / "hf").glob("*.safetensors") for k, v in load_file(str(p)).items()}
    for name, w in weights(engine).items():
        assert torch.equal(exported[name], w), name
    D.destroy_engine(engine)


@pytest.mark.parametrize(
    "overrides, want",
    [
        ((), torch.float32),
        (("deepspeed.grad_accum_dtype=model", "deepspeed.communication_data_type=model"), torch.bfloat16),
    ],
    ids=["default-fp32", "model-bf16"],
)
def test_bf16_engine_accumulates_and_reduces_in_the_configured_dtype(overrides, want):
    """The engine's effective precision (DeepSpeed's CPU accelerator builds ZeRO-3 in bf16): by
    default a bf16 run adds the forwards' gradient partitions in fp32 and reduce-scatters fp32;
    ``model`` gives DeepSpeed's own default, the weights' bf16."""
    engine, cfg = tiny_engine("model.dtype=bf16", *overrides)
    try:
        assert engine.get_data_types() == (torch.bfloat16, want)
        assert engine.communication_data_type == want
        opt = engine.optimizer  # ZeRO-3's optimizer: what it was built with, and the buffers it made
        assert next(engine.module.parameters()).dtype == torch.bfloat16
        assert (opt.gradient_accumulation_dtype, opt.communication_data_type) == (want, want)
        assert opt.grad_partitions_flat_buffer.dtype == want  # where each backward's partition is added
        assert list(opt.ipg_buckets) == [want]  # the reduce-scatter buckets
        t = StageTrainer(engine, cfg.train, examples(), [list(range(8))], 0, 1, Monitor("", enabled=False), print)
        assert math.isfinite(t.run()["train_loss"])  # and it trains
    finally:
        D.destroy_engine(engine)


def test_bf16_zero2_engine_accumulates_in_fp32():
    """zero2.json takes the same keys: DeepSpeed's ZeRO-2 optimizer accumulates in fp32 too."""
    engine, cfg = tiny_engine("model.dtype=bf16", "deepspeed.config=zero2.json")
    try:
        assert engine.zero_optimization_stage() == 2
        assert engine.get_data_types() == (torch.bfloat16, torch.float32)
        assert engine.communication_data_type == torch.float32
        assert engine.optimizer.gradient_accumulation_dtype == torch.float32
        t = StageTrainer(engine, cfg.train, examples(), [list(range(8))], 0, 1, Monitor("", enabled=False), print)
        assert math.isfinite(t.run()["train_loss"])
    finally:
        D.destroy_engine(engine)
