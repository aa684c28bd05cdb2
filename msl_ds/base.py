"""Build a base model that knows a world's stage 0: tokenizer, tiny model, training, check.

    deepspeed --num_gpus 2 launch/make_base.py ds_configs/run_cpu_default.yaml [key=value ...]
    deepspeed --num_gpus 2 $(which msl-make-base) run_cpu_default.yaml [key=value ...]   # installed

Trains a SentencePiece tokenizer on the world's text, writes a randomly initialised model from
``base.arch``, trains it under the same ZeRO-3 engine as the stages on stage 0's training data
plus the instruction skills derived from it (paraphrase, background, expansion), and exports it
to ``base.out_dir`` with its accuracy on stage 0's held-out phrasings and on the general probe.
Works for any world that follows the README data layout. Cached: a finished build is not redone. With
``base.init`` it starts from that model directory instead (its tokenizer, chat template and
``generation_config`` end tokens are kept): how the tests build Llama-3/Qwen2/Gemma-style bases.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from msl_ds import distributed as D
from msl_ds.config import load_config, load_deepspeed_config
from msl_ds.data import encode_rows, load_rows, load_world, stage_plan
from msl_ds.engine import Checkpoints, build_engine
from msl_ds.evaluation import accuracy, evaluate_sets
from msl_ds.generation import GenConfig, release_generation_copy
from msl_ds.io import MARKER, marker_ok, read_json, write_json, write_marker
from msl_ds.kernels import LossConfig
from msl_ds.modeling import build_tokenizer, check_model_dir, export_model, init_model_dir, load_tokenizer
from msl_ds.monitor import Monitor, set_progress
from msl_ds.skills import skill_rows
from msl_ds.trainer import StageTrainer, rng_state, set_rng_state

log = logging.getLogger("msl_ds")
GENERAL_BASE = "general_base.jsonl"  # msl_ds.world: the general probe's items, for the base build only


def world_texts(world) -> list[str]:
    """Every question and answer of the world, plus the skills' templates' words."""
    rows = [r for s in world.stages.values() for split in s.values() for r in split] + world.retain + world.general
    return [r["question"] for r in rows] + [r["answer"] for r in rows]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    cfg = dataclasses.replace(cfg, train=cfg.base.train)  # the base build has its own schedule
    D.init(cfg.deepspeed.backend, cfg.deepspeed.timeout_s, cfg.deepspeed.threads_per_rank)
    logging.basicConfig(
        level=logging.INFO if D.is_rank0() else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    set_progress(cfg.monitor.progress)
    out = Path(cfg.base.out_dir)
    build = out.with_name(out.name + ".build")
    source = build_source(cfg)
    if marker_ok(out):
        built_from = read_json(out / MARKER).get("source")
        if built_from == source:
            if D.is_rank0():
                print(f"base model already built: {out} {read_json(out / 'base_metrics.json')}")
            return
        D.barrier()  # every rank has read the old marker before rank 0 removes it
        if D.is_rank0():
            log.warning("%s was built from another world or base config (%s): rebuilding it", out, built_from)
            shutil.rmtree(out)
            shutil.rmtree(build, ignore_errors=True)  # its checkpoints belong to the old build
        D.barrier()
    t0 = time.time()
    world = load_world(cfg.data.dir)
    init_dir = Path(cfg.base.init) if cfg.base.init else build / "init"  # base.init: a model of one's own
    if cfg.base.init:
        check_model_dir(init_dir, cfg.data.max_seq_len)
    elif D.is_rank0() and not (init_dir / "config.json").is_file():
        tok = build_tokenizer(
            world_texts(world) + skill_templates(cfg), build / "tokenizer", cfg.base.vocab_size, cfg.run.seed
        )
        tmp = build / "init.tmp"
        init_model_dir(cfg.base.arch, tok, tmp, cfg.run.seed)
        tmp.rename(init_dir)
    D.barrier()
    tokenizer = load_tokenizer(init_dir, cfg.model.chat_template, cfg.model.trust_remote_code)

    rows = list(world.split(0, "train"))
    if cfg.base.skills:
        rows += skill_rows(rows, cfg.skills, cfg.run.seed)
    # the general probe's held-out items: the base model learns them; no stage file holds them
    rows += load_rows(Path(cfg.data.dir) / GENERAL_BASE, required=False)
    examples = encode_rows(tokenizer, rows, cfg.data.max_seq_len, cfg.data.overlong, f"{cfg.data.dir}/stage_00/train")
    t = cfg.train
    plan = stage_plan(examples, t, D.world_size(), cfg.run.seed)
    ds_config = load_deepspeed_config(cfg, D.world_size())
    engine, pad = build_engine(cfg, ds_config, init_dir, len(plan))
    ckpts = Checkpoints(build / "ckpt", 0)
    client = ckpts.load(engine)
    start = client["step"] if client else 0
    if client:
        set_rng_state(client["rng"])

    def save(step: int) -> None:
        ckpts.save(engine, step, {"stage": 0, "rng": rng_state()})

    monitor = Monitor(build / "tb", cfg.monitor.tensorboard)
    trainer = StageTrainer(engine, t, examples, plan, pad, 0, monitor, save, loss_cfg=LossConfig(loss_norm=t.loss_norm))
    stats = trainer.run(start) if start < len(plan) else {}
    gen = dataclasses.replace(GenConfig.from_eval(cfg.eval, cfg.run.seed), do_sample=False)  # greedy: a fixed yardstick
    sets = {"stage_00": world.split(0, cfg.data.eval_split), "general": world.general}
    sets = {k: v for k, v in sets.items() if v}
    results = evaluate_sets(engine.module, tokenizer, pad, sets, gen, "base eval")
    release_generation_copy()
    export_model(engine.module, tokenizer, pad, out)
    D.destroy_engine(engine)
    monitor.close()
    if D.is_rank0():
        metrics = {f"{k}_acc": accuracy(v) for k, v in results.items()}
        metrics.update(
            {
                "train_rows": len(rows),
                "skill_rows": len(rows) - len(world.split(0, "train")),
                "steps": len(plan),
                "seconds": time.time() - t0,
                **{k: v for k, v in stats.items() if k != "train_steps"},
            }
        )
        write_json(out / "base_metrics.json", metrics)
        write_marker(out, ["base_metrics.json", "config.json", "model.safetensors"], {"source": source})
        short = [k for k, v in metrics.items() if k.endswith("_acc") and v < cfg.base.min_accuracy]
        print(
            f"base model: {out} "
            + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        )
        if short:
            print(f"WARNING: {short} below base.min_accuracy={cfg.base.min_accuracy}", flush=True)
    D.shutdown()


def build_source(cfg) -> dict[str, str]:
    """What a base model is built from: the world's manifest and every setting of the build.

    A cached base whose marker records another source (the world was regenerated, a base setting
    changed) is rebuilt instead of trusted.
    """
    settings = {
        "base": dataclasses.asdict(cfg.base),
        "skills": dataclasses.asdict(cfg.skills),
        "seed": cfg.run.seed,
        "max_seq_len": cfg.data.max_seq_len,
        "chat_template": cfg.model.chat_template,
    }
    data = Path(cfg.data.dir)
    files = sorted(p for p in [*data.glob("stage_00/*"), *data.glob("*.json*"), *data.glob("*.parquet")] if p.is_file())
    world = hashlib.sha256()
    for p in files:  # stage 0, the probes and the manifest: what the build reads and reports on
        world.update(f"{p.relative_to(data)}\0".encode() + hashlib.sha256(p.read_bytes()).digest())
    return {
        "world": world.hexdigest(),
        "settings": hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest(),
    }


def skill_templates(cfg) -> list[str]:
    s = cfg.skills
    return [s.paraphrase_prompt, s.background_prompt, s.expansion_prompt, s.background_fact, s.expansion_question]


if __name__ == "__main__":
    main()
