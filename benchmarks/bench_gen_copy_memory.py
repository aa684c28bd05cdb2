"""Peak memory of the generation copy (``distributed.unpartitioned_copy``) against its weights.

    MALLOC_MMAP_THRESHOLD_=65536 deepspeed --num_gpus 2 benchmarks/bench_gen_copy_memory.py [--hidden 512]
        [--layers 8] [--vocab 32000] [--dtype bf16]

Builds a random Llama of the given size in a temporary directory, loads it partitioned under
ZeRO-3 into a real engine, then builds the generation copy on every rank, and, for comparison, the
copy as msl_ds built it before (randomly initialised in fp32, cast, filled from a state dict of
per-parameter ``GatheredParameters``). Each rank samples its own resident set (``/proc/self/statm``)
every millisecond while a copy is built; rank 0 prints the peak growth over the copy's weights.
On CUDA it reads the allocator's peak instead. ``MALLOC_MMAP_THRESHOLD_`` makes glibc return every
freed large block at once, so the resident set follows torch's allocations (without it the CPU
numbers are upper bounds).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from msl_ds import distributed as D  # noqa: E402
from msl_ds.config import load_config, load_deepspeed_config  # noqa: E402
from msl_ds.engine import build_engine  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Peak:
    """Peak bytes in use during the block, beyond those in use at its start."""

    def __enter__(self):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.start
            return
        self.running = False
        self.thread.join()
        self.extra = max(self.peak, rss()) - self.start


def old_copy(module: torch.nn.Module) -> torch.nn.Module:
    """The copy as msl_ds built it before: fp32 random init, cast (buffers too), state dict."""
    dtype = next(module.parameters()).dtype
    with torch.device(D.device()):
        clone = type(module)(copy.deepcopy(module.config)).to(dtype)
    state = {}
    for name, p in module.named_parameters():
        ctx = D._deepspeed().zero.GatheredParameters([p]) if D.is_partitioned(p) else contextlib.nullcontext()
        with ctx:
            state[name] = p.detach().clone()
    clone.load_state_dict(state, strict=False)
    del state
    return clone.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied ones once


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args()
    D.init("auto")
    cfg = load_config(
        Path(__file__).resolve().parent.parent / "ds_configs" / "run_cpu_tiny.yaml",
        [f"model.dtype={args.dtype}", "data.max_seq_len=64", "monitor.tensorboard=false"],
    )
    ds = load_deepspeed_config(cfg, D.world_size())
    tmp = Path(D.broadcast_object(tempfile.mkdtemp(prefix="gen_copy_mem_") if D.is_rank0() else None))
    if D.is_rank0():
        from transformers import AutoModelForCausalLM, LlamaConfig

        arch = LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 11 // 4,
            num_hidden_layers=args.layers,
            num_attention_heads=max(1, args.hidden // 64),
            num_key_value_heads=max(1, args.hidden // 256),
            max_position_embeddings=2048,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
            tie_word_embeddings=False,
        )
        AutoModelForCausalLM.from_config(arch).save_pretrained(str(tmp), safe_serialization=True)
    D.barrier()
    engine, _ = build_engine(cfg, ds, tmp)
    module = engine.module
    rows = []
    for name, build in (("new", D.unpartitioned_copy), ("before", old_copy), ("new again", D.unpartitioned_copy)):
        with Peak() as peak:
            clone = build(module)
        w = weight_bytes(clone)
        inv = next((str(b.dtype) for n, b in clone.named_buffers() if n.endswith("inv_freq")), "-")
        worst = max(D.all_gather_objects(peak.extra))
        rows.append((name, w, worst, inv))
        del clone
        gc.collect()
    if D.is_rank0():
        params = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
        print(f"\nmodel: {params / 1e6:.1f}M parameters, {args.dtype}, {D.world_size()} ranks, device {D.device()}")
        print("| copy | weights MiB | peak extra MiB (worst rank) | peak / weights | inv_freq |")
        print("|---|---|---|---|---|")
        for name, w, extra, inv in rows:
            print(f"| {name} | {w / 2**20:.1f} | {extra / 2**20:.1f} | {extra / w:.3f} | {inv} |")
    D.destroy_engine(engine)
    D.shutdown()


if __name__ == "__main__":
    main()
