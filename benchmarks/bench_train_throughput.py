"""Training throughput: the msl_ds stage engine against transformers.Trainer + DeepSpeed ZeRO-3.

    deepspeed --num_gpus 2 benchmarks/bench_train_throughput.py [--steps 40] [--hidden 192]
    deepspeed --num_gpus 2 benchmarks/bench_train_throughput.py --set train.logprobs=fused_linear \
        train.gradient_checkpointing=true

Both contenders run in this one invocation on the same ranks, the same tiny Llama (same init),
the same rows (the tiny world's stage-0 training data, tokenised the same way), the same
micro-batch, accumulation and ZeRO-3 JSON, each for ``--steps`` optimizer steps after
``--warmup`` steps that are not timed. Throughput counts every non-pad token of the batches.
Rank 0 prints a table with the ratio msl_ds / Trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from msl_ds import distributed as D  # noqa: E402
from msl_ds.config import load_config, load_deepspeed_config  # noqa: E402
from msl_ds.data import batch_plan, collate, encode_rows  # noqa: E402
from msl_ds.engine import build_engine  # noqa: E402
from msl_ds.modeling import build_tokenizer, init_model_dir, load_tokenizer  # noqa: E402
from msl_ds.monitor import Monitor, set_progress  # noqa: E402
from msl_ds.trainer import StageTrainer  # noqa: E402
from msl_ds.world import generate_world  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "ds_configs" / "run_cpu_tiny.yaml"


def setup_model(tmp: Path, hidden: int, layers: int):
    world = generate_world("tiny", seed=0)
    rows = world.stages[0]["train"]
    if D.is_rank0():
        texts = [r["question"] for r in rows] + [r["answer"] for r in rows]
        tok = build_tokenizer(texts, tmp / "tok", 1200)
        arch = {
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": hidden * 8 // 3,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 128,
        }
        init_model_dir(arch, tok, tmp / "model", seed=0)
    D.barrier()
    return rows, load_tokenizer(tmp / "model")


def run_msl(cfg, ds, model_dir, tok, examples, steps: int, warmup: int) -> tuple[float, int]:
    plan = batch_plan(
        len(examples), cfg.train.micro_batch_size, cfg.train.grad_accum, D.world_size(), 1, steps + warmup, seed=0
    )
    engine, pad = build_engine(cfg, ds, model_dir, len(plan))
    trainer = StageTrainer(engine, cfg.train, examples, plan[:warmup], pad, 0, Monitor("", False), lambda s: None)
    trainer.run(0)
    D.barrier()
    trainer.plan = plan
    t0 = time.perf_counter()
    trainer.run(warmup)
    D.barrier()
    elapsed = time.perf_counter() - t0
    tokens = sum(len(examples[i].input_ids) for step in plan[warmup:] for i in step)
    D.destroy_engine(engine)
    return elapsed, tokens


class _Rows(torch.utils.data.Dataset):
    def __init__(self, examples, order):
        self.examples, self.order = examples, order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        return self.examples[self.order[i]]


def run_hf_trainer(cfg, ds, model_dir, tok, examples, steps: int, warmup: int, out: Path) -> tuple[float, int]:
    """transformers.Trainer with the same ZeRO-3 JSON; timed between two step callbacks."""
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    # Same threads per rank as the msl_ds run. Left unset, accelerate picks
    # physical cores / local ranks from psutil (2 per rank on this 2-core VM): oversubscribed
    # ranks spinning in gloo made the Trainer 10x slower in a first measurement, which says
    # nothing about either trainer.
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    w = D.world_size()
    mb, ga = cfg.train.micro_batch_size, cfg.train.grad_accum
    plan = batch_plan(len(examples), mb, ga, w, 1, steps + warmup, seed=0)
    order = [i for step in plan for i in step]  # the Trainer's sampler shards this across ranks
    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == warmup:
                D.barrier()
                marks["start"] = time.perf_counter()
            if state.global_step == warmup + steps:
                D.barrier()
                marks["end"] = time.perf_counter()

    ds_hf = {k: v for k, v in ds.items() if k != "tensorboard"}
    ds_hf.update(
        {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
            "gradient_clipping": "auto",
        }
    )
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=mb,
        gradient_accumulation_steps=ga,
        max_steps=steps + warmup,
        learning_rate=cfg.train.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_grad_norm=cfg.train.grad_clip,
        deepspeed=ds_hf,
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        dataloader_drop_last=True,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=0,
        data_seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    pad = tok.pad_token_id

    counted = [0]

    def collate_fn(batch):
        b = collate(batch, pad)
        if "start" in marks and "end" not in marks:  # batches of the timed steps only
            counted[0] += int(b["attention_mask"].sum())
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": _unshift(b["labels"])}

    trainer = Trainer(
        model=model, args=args, train_dataset=_Rows(examples, order), data_collator=collate_fn, callbacks=[Clock()]
    )
    trainer.train()
    return marks["end"] - marks["start"], int(D.all_reduce_sum([counted[0]])[0])


def _unshift(labels: torch.Tensor) -> torch.Tensor:
    """HF models shift labels themselves; our collate hands over already-shifted targets."""
    out = torch.full_like(labels, -100)
    out[:, 1:] = labels[:, :-1]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--ds", default="zero3.json")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="run-config overrides for the msl_ds contender, e.g. train.logprobs=fused_linear "
        "train.gradient_checkpointing=true",
    )
    p.add_argument("--local_rank", type=int, default=None)
    a = p.parse_args()
    cfg = load_config(
        CONFIG,
        [f"train.micro_batch_size={a.micro}", f"deepspeed.config={a.ds}", "train.log_every_steps=1000000", *a.set],
    )
    cfg = dataclasses.replace(cfg)
    D.init("auto")
    set_progress(False)
    ds = load_deepspeed_config(cfg, D.world_size())
    tmp = Path(D.broadcast_object(tempfile.mkdtemp(prefix="msl_bench_") if D.is_rank0() else None))
    rows, tok = setup_model(tmp, a.hidden, a.layers)
    examples = encode_rows(tok, rows, 96, "error", "tiny/stage_00")
    results = {}
    results["msl_ds engine"] = run_msl(cfg, ds, tmp / "model", tok, examples, a.steps, a.warmup)
    results["transformers.Trainer"] = run_hf_trainer(
        cfg, ds, tmp / "model", tok, examples, a.steps, a.warmup, tmp / "hf"
    )
    if D.is_rank0():
        base = results["transformers.Trainer"]
        print(
            f"\nTraining throughput, {D.world_size()} ranks, {a.ds}, Llama hidden {a.hidden} x {a.layers} layers, "
            f"micro-batch {a.micro}, {a.steps} timed steps after {a.warmup} warmup"
            + (f", msl_ds with {' '.join(a.set)}" if a.set else "")
        )
        print("| contender | seconds | tokens | tokens/s | ratio vs Trainer |")
        print("|---|---|---|---|---|")
        for name, (sec, tokens) in results.items():
            print(
                f"| {name} | {sec:.2f} | {tokens} | {tokens / sec:.0f} | {(tokens / sec) / (base[1] / base[0]):.2f}x |"
            )
        shutil.rmtree(tmp, ignore_errors=True)
    D.shutdown()


if __name__ == "__main__":
    main()
