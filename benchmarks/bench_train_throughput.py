"""Training throughput: the msl_ds stage engine against transformers.Trainer + DeepSpeed ZeRO-3.

    deepspeed --num_gpus 2 benchmarks/bench_train_throughput.py [--steps 40] [--hidden 192]
    deepspeed --num_gpus 2 benchmarks/bench_train_throughput.py --set train.logprobs=fused_linear \
        train.gradient_checkpointing=true
    python benchmarks/bench_train_throughput.py --preset 1b --seq 2048 --micro 4 --set model.dtype=bf16 \
        --variants logits fused_linear logits+ckpt fused_linear+ckpt --json /tmp/train.json    # one GPU

All contenders run in this one invocation on the same ranks, the same Llama (same init, built by
``benchmarks/bench_model.py``: any size, any vocabulary), the same rows, the same micro-batch,
accumulation and ZeRO-3 JSON, each for ``--steps`` optimizer steps after ``--warmup`` steps that
are not timed. Rows: with the tiny world's own tokenizer (``--vocab 0``, the default) its stage-0
training rows, cut at ``--seq`` tokens; with a larger ``--vocab`` (or a preset) random rows of
exactly ``--seq`` tokens, the first quarter prompt, the rest answer. Throughput counts every
non-pad token of the timed batches; MFU is ``msl_ds.telemetry``'s (``6 N + 12 L H T`` FLOPs per
token against the device's peak; NaN on a CPU). Each msl_ds variant (``--variants``: ``logits``
or ``fused_linear``, ``+ckpt`` for gradient checkpointing, ``+packing``) also reports its peak
memory (CUDA) and, with ``--max-micro``, the largest micro-batch that fits, estimated from the
peaks of one more step at twice the micro-batch (linear in the rows). Rank 0 prints a table with
the ratio to the Trainer and, with ``--json``, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_model import add_arguments, sizes, write_model  # noqa: E402

from msl_ds import distributed as D  # noqa: E402
from msl_ds.config import load_config, load_deepspeed_config  # noqa: E402
from msl_ds.data import Example, batch_plan, collate, encode_rows  # noqa: E402
from msl_ds.engine import build_engine  # noqa: E402
from msl_ds.logprobs import AnswerLogprobs  # noqa: E402
from msl_ds.modeling import DTYPES, load_tokenizer  # noqa: E402
from msl_ds.monitor import Monitor, set_progress  # noqa: E402
from msl_ds.telemetry import device_peak_tflops, flops_per_token, param_count  # noqa: E402
from msl_ds.trainer import StageTrainer  # noqa: E402
from msl_ds.world import generate_world  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "ds_configs" / "run_cpu_tiny.yaml"
GIB = float(1 << 30)
VARIANT_KEYS = {
    "logits": "train.logprobs=logits",
    "fused_linear": "train.logprobs=fused_linear",
    "ckpt": "train.gradient_checkpointing=true",
    "packing": "train.packing=true",
}


def setup_model(tmp: Path, a: argparse.Namespace, n_rows: int) -> tuple[list[Example], object]:
    """Rank 0 writes the model (``bench_model.py``); every rank builds the same rows."""
    s = sizes(a)
    s["positions"] = max(s["positions"], a.seq)
    if D.is_rank0() and not a.model_dir:
        write_model(tmp / "model", s, dtype="bf16" if a.dtype == "bf16" else "fp32")
    D.barrier()
    tok = load_tokenizer(model_path(tmp, a))
    if s["vocab"] == 0 and not a.model_dir:  # the tiny world's rows, as the first version of this bench measured
        rows = generate_world("tiny", seed=0).stages[0]["train"]
        return encode_rows(tok, rows, a.seq, "truncate", "tiny/stage_00"), tok
    return random_rows(n_rows, a.seq, len(tok)), tok


def model_path(tmp: Path, a: argparse.Namespace) -> Path:
    """``--model-dir`` when given (a ``bench_model.py`` directory), else the one written into ``tmp``."""
    return Path(a.model_dir) if a.model_dir else tmp / "model"


def random_rows(n: int, length: int, vocab: int, seed: int = 0) -> list[Example]:
    """``n`` rows of ``length`` random ids (never 0-3, the special ids): a quarter prompt, the rest answer."""
    g = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [g.randrange(4, vocab) for _ in range(length)]
        cut = length // 4
        out.append(Example(input_ids=ids, labels=[-100] * cut + ids[cut:], row={}))
    return out


def variant_overrides(name: str) -> list[str]:
    """``fused_linear+ckpt`` -> the run-config overrides it stands for."""
    parts = name.split("+")
    unknown = [x for x in parts if x not in VARIANT_KEYS]
    if unknown:
        raise SystemExit(f"--variants: unknown part(s) {unknown} of {name!r}; use {sorted(VARIANT_KEYS)} joined by '+'")
    return [VARIANT_KEYS[x] for x in parts]


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    """Peak allocated CUDA memory since the last reset (NaN on a CPU: its RSS peak is never reset)."""
    return torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else float("nan")


def run_msl(cfg, ds, model_dir, examples, a) -> dict:
    steps, warmup = a.steps, a.warmup
    plan = batch_plan(
        len(examples), cfg.train.micro_batch_size, cfg.train.grad_accum, D.world_size(), 1, steps + warmup, seed=0
    )
    engine, pad = build_engine(cfg, ds, model_dir, len(plan))
    trainer = StageTrainer(engine, cfg.train, examples, plan[:warmup], pad, 0, Monitor("", False), lambda s: None)
    trainer.run(0)
    D.barrier()
    trainer.plan = plan
    reset_peak()
    t0 = time.perf_counter()
    trainer.run(warmup)
    D.barrier()
    elapsed = time.perf_counter() - t0
    out = {"seconds": elapsed, "peak_gib": peak_gib(), "n_params": param_count(engine.module)}
    out["tokens"] = sum(len(examples[i].input_ids) for step in plan[warmup:] for i in step)
    if a.max_micro:
        out.update(max_micro(engine, trainer.logprobs, examples, pad, cfg.train.micro_batch_size, out["peak_gib"]))
    D.destroy_engine(engine)
    return out


def max_micro(engine, answer: AnswerLogprobs, examples, pad, micro: int, peak_m: float) -> dict:
    """The largest micro-batch that fits, from the peak at ``micro`` (the timed steps) and at
    ``2 micro`` (one more step here), assuming memory linear in the rows. CUDA, one rank only
    (an out-of-memory error on one rank of several would leave the others waiting)."""
    if not torch.cuda.is_available() or D.world_size() > 1:
        return {"max_micro": float("nan"), "peak_2x_gib": float("nan")}
    rows = [examples[i % len(examples)] for i in range(2 * micro)]
    batch = {k: v.to(D.device()) for k, v in collate(rows, pad).items()}
    reset_peak()
    D.set_accumulation_boundary(engine, True)
    try:
        logps, n = answer(batch["input_ids"], batch["attention_mask"], batch["labels"], inplace_backward=True)
        engine.backward(-logps.sum() / n.sum())
        engine.step()
    except torch.cuda.OutOfMemoryError:
        return {"max_micro": float(2 * micro - 1), "peak_2x_gib": float("inf")}  # fits micro, not 2 micro
    peak_2m = peak_gib()
    per_row = max((peak_2m - peak_m) / micro, 1e-9)
    capacity = torch.cuda.get_device_properties(D.device()).total_memory / GIB * 0.95
    return {
        "max_micro": float(max(2 * micro, math.floor(2 * micro + (capacity - peak_2m) / per_row))),
        "peak_2x_gib": peak_2m,
    }


class _Rows(torch.utils.data.Dataset):
    def __init__(self, examples, order):
        self.examples, self.order = examples, order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        return self.examples[self.order[i]]


def run_hf_trainer(cfg, ds, model_dir, tok, examples, a, out: Path) -> dict:
    """transformers.Trainer with the same ZeRO-3 JSON; timed between two step callbacks."""
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    steps, warmup = a.steps, a.warmup
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
                reset_peak()
                marks["start"] = time.perf_counter()
            if state.global_step == warmup + steps:
                D.barrier()
                marks["end"] = time.perf_counter()
                marks["peak"] = peak_gib()

    ds_hf = {k: v for k, v in ds.items() if k != "tensorboard"}
    ds_hf.update(
        {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
            "gradient_clipping": "auto",
        }
    )
    ckpt = cfg.train.gradient_checkpointing
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
        bf16=cfg.model.dtype == "bf16",
        gradient_checkpointing=ckpt,
        gradient_checkpointing_kwargs={"use_reentrant": False} if ckpt else None,
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
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES[cfg.model.dtype])
    pad = tok.pad_token_id

    def collate_fn(batch):
        b = collate(batch, pad)
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": _unshift(b["labels"])}

    trainer = Trainer(
        model=model, args=args, train_dataset=_Rows(examples, order), data_collator=collate_fn, callbacks=[Clock()]
    )
    trainer.train()
    n_params = param_count(model)
    del trainer, model
    return {
        "seconds": marks["end"] - marks["start"],
        # the timed steps' rows, as for msl_ds (counting collated batches would be off by the
        # batches the data loader prefetches before the clock starts)
        "tokens": sum(len(examples[i].input_ids) for step in plan[warmup:] for i in step),
        "peak_gib": marks["peak"],
        "n_params": n_params,
    }


def _unshift(labels: torch.Tensor) -> torch.Tensor:
    """HF models shift labels themselves; our collate hands over already-shifted targets."""
    out = torch.full_like(labels, -100)
    out[:, 1:] = labels[:, :-1]
    return out


def mfu(r: dict, s: dict, seq: float, world: int) -> float:
    peak = device_peak_tflops()
    flops = flops_per_token(r["n_params"], s["layers"], s["hidden"], seq) * r["tokens"] / r["seconds"]
    return flops / (peak * 1e12 * world) if math.isfinite(peak) else float("nan")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--seq", type=int, default=96, help="row length: world rows cut here, random rows exactly this")
    p.add_argument("--ds", default="zero3.json")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="model.dtype (default: the config's)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=[""],
        help="msl_ds contenders: logits | fused_linear, '+ckpt' for gradient checkpointing, '+packing' "
        "(default: one, the config as --set leaves it)",
    )
    p.add_argument("--no-trainer", action="store_true", help="skip transformers.Trainer")
    p.add_argument("--max-micro", action="store_true", help="estimate each variant's largest micro-batch (CUDA)")
    p.add_argument("--json", default=None, help="also write the results here (rank 0)")
    p.add_argument("--model-dir", default=None, help="a bench_model.py directory to use (its sizes: pass them too)")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="run-config overrides for every contender, e.g. train.logprobs=fused_linear "
        "train.gradient_checkpointing=true (the Trainer follows model.dtype and train.gradient_checkpointing)",
    )
    add_arguments(p)
    p.add_argument("--local_rank", type=int, default=None)
    a = p.parse_args()
    base = [f"train.micro_batch_size={a.micro}", f"deepspeed.config={a.ds}", "train.log_every_steps=1000000"]
    base += [f"data.max_seq_len={a.seq}", *([f"model.dtype={a.dtype}"] if a.dtype else []), *a.set]
    cfg = load_config(CONFIG, base)
    a.dtype = cfg.model.dtype
    D.init("auto")
    set_progress(False)
    ds = load_deepspeed_config(cfg, D.world_size())
    tmp = Path(D.broadcast_object(tempfile.mkdtemp(prefix="msl_bench_") if D.is_rank0() else None))
    n_rows = a.micro * cfg.train.grad_accum * D.world_size() * (a.steps + a.warmup)
    examples, tok = setup_model(tmp, a, n_rows)
    s = sizes(a)
    seq = sum(len(e.input_ids) for e in examples) / len(examples)
    results = {}
    for v in a.variants:
        vcfg = load_config(CONFIG, base + (variant_overrides(v) if v else []))
        results[f"msl_ds {v}".strip()] = run_msl(vcfg, ds, model_path(tmp, a), examples, a)
    if not a.no_trainer:
        results["transformers.Trainer"] = run_hf_trainer(cfg, ds, model_path(tmp, a), tok, examples, a, tmp / "hf")
    if D.is_rank0():
        report(results, a, s, seq, cfg)
        shutil.rmtree(tmp, ignore_errors=True)
    D.shutdown()


def report(results: dict, a, s: dict, seq: float, cfg) -> None:
    w = D.world_size()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"\nTraining throughput, {w} rank(s) on {dev}, {a.ds}, {cfg.model.dtype}, Llama hidden {s['hidden']} x "
        f"{s['layers']} layers, vocab {s['vocab'] or 'tiny world'}, rows of {seq:.0f} tokens, micro-batch {a.micro}, "
        f"{a.steps} timed steps after {a.warmup} warmup" + (f", all with {' '.join(a.set)}" if a.set else "")
    )
    print("| contender | seconds | tokens | tokens/s | MFU | peak GiB | max micro-batch (est.) | ratio vs Trainer |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results.values():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["mfu"] = mfu(r, s, seq, w)
    ref = results.get("transformers.Trainer")
    for name, r in results.items():
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        mm = r.get("max_micro", float("nan"))
        print(
            f"| {name} | {r['seconds']:.2f} | {r['tokens']} | {r['tokens_per_s']:.0f} | {_pct(r['mfu'])} | "
            f"{_num(r['peak_gib'])} | {'-' if math.isnan(mm) else int(mm)} | {ratio} |"
        )
    if a.json:
        Path(a.json).write_text(json.dumps({"device": dev, "world": w, "sizes": s, "results": results}, indent=1))


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}%"


def _num(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"


if __name__ == "__main__":
    main()
