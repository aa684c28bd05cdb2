"""GPU sweep: launch shapes of the logits kernels and block sizes of the fused-linear path.

Chooses the defaults in ``msl_ds/kernels`` (``_launch_cfg`` and ``TRITON_CHUNK_*``); the
targets themselves are checked by ``bench_preference_loss.py``.  CUDA only.

Table 1, one row per (V, BLOCK_V, num_warps): the forward kernel alone and the in-place
backward kernel alone on bf16 logits [N, T, V], median of CUDA-event timings, as GB/s
(forward reads N·T·V·2 bytes, backward reads and writes them) and as a multiple of the
copy-bandwidth floor measured in the same run.

Table 2, one row per (chunk_tokens, chunk_vocab, keep_blocks): one forward+backward of
``fused_linear_sequence_logprobs`` (bf16 hidden [N·T, H], weight [V, H]) with its peak
extra memory, against ``matmul`` (``hidden @ W.T``, forward and both backward matmuls)
and ``matmul+kernel`` (the same plus the in-place logits kernel) timed in the same run.

    python benchmarks/sweep_kernel_blocks.py                 # 16k tokens, V 32000/128256, H 4096
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

LAUNCH = [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (4096, 16), (8192, 8), (8192, 16), (16384, 16)]
# (chunk_tokens, chunk_vocab, keep_blocks)
CHUNKS = [
    (1024, 8192, 0),
    (4096, 8192, 0),
    (16384, 8192, 0),
    (8192, 16384, 0),
    (16384, 16384, 0),
    (16384, 32768, 0),
    (16384, 16384, 1),
    (16384, 16384, 2),
    (16384, 16384, 3),
    (16384, 8192, 4),
]


def cuda_time(fn, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs (after two warm-ups), CUDA events."""
    import torch

    for _ in range(2):
        fn()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return statistics.median(out)


def copy_bandwidth() -> float:
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    return 2 * src.numel() / cuda_time(lambda: dst.copy_(src), 10)


def sweep_launch(N: int, T: int, vocab: list[int], bw: float, reps: int) -> None:
    import torch

    print("| V | BLOCK_V | warps | fwd ms | fwd GB/s | bwd ms | bwd GB/s | (fwd+bwd) x floor |")
    print("|---|---|---|---|---|---|---|---|")
    for V in vocab:
        x = torch.randn(N, T, V, device="cuda", dtype=torch.bfloat16) * 2
        tg = torch.randint(0, V, (N, T), device="cuda")
        mk = torch.ones(N, T, dtype=torch.uint8, device="cuda")
        lse = torch.empty(N, T, device="cuda")
        tok = torch.empty(N, T, device="cuda")
        g = torch.randn(N, device="cuda")
        nbytes = N * T * V * 2
        for bv, nw in LAUNCH:
            if bv > 2 * V:
                continue
            f, b = _kernel_calls(x, tg, mk, lse, tok, g, bv, nw)
            tf = cuda_time(f, reps)
            x.normal_()  # the in-place backward overwrites x; time it on fresh random values
            tb = cuda_time(b, reps)
            x.normal_()
            floor = 3 * nbytes / bw
            print(
                f"| {V} | {bv} | {nw} | {tf * 1e3:.3f} | {nbytes / tf / 1e9:.0f} | {tb * 1e3:.3f} "
                f"| {2 * nbytes / tb / 1e9:.0f} | {(tf + tb) / floor:.2f} |",
                flush=True,
            )


def _kernel_calls(x, tg, mk, lse, tok, g, bv, nw):
    """The forward and the in-place backward launch on logits ``x`` [N, T, V]."""
    from msl_ds.kernels import triton_logprob as tlp

    fwd, bwd = tlp._kernels()[:2]
    N, T, V = x.shape
    sx, st, sm = (x.stride(0), x.stride(1)), (tg.stride(0), tg.stride(1)), (mk.stride(0), mk.stride(1))

    def f():
        fwd[(N * T,)](x, tg, mk, lse, tok, T, V, *sx, *st, *sm, -100, BLOCK_V=bv, num_warps=nw)

    def b():
        bwd[(N * T,)](x, x, tg, mk, lse, g, T, V, *sx, *sx, *st, *sm, -100, BLOCK_V=bv, num_warps=nw)

    return f, b


def _linear_step(h, w, tg, mk):
    """One forward+backward of ``kind`` on hidden ``h`` [1, M, H] and lm-head ``w`` [V, H]."""
    import torch

    from msl_ds.kernels import fused_linear_sequence_logprobs, sequence_logprobs

    def step(kind, ct=None, cv=None, keep=0):
        h.grad = w.grad = None
        if kind == "matmul":
            z = h @ w.T
            z.backward(z.detach())  # any gradient of the logits' shape: both backward matmuls
        elif kind == "matmul+kernel":
            lp, _ = sequence_logprobs(h @ w.T, tg, mk, backend="triton", inplace_backward=True)
            lp.sum().backward()
        else:
            lp, _ = fused_linear_sequence_logprobs(h, w, tg, mk, chunk_tokens=ct, chunk_vocab=cv, keep_blocks=keep)
            lp.sum().backward()

    def peak(kind, ct=None, cv=None, keep=0):
        torch.cuda.synchronize()
        h.grad = w.grad = None
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(kind, ct, cv, keep)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    return step, peak


def sweep_chunks(M: int, H: int, vocab: list[int], reps: int) -> None:
    import torch

    print("| V | contender | chunk_tokens | chunk_vocab | keep | fwd+bwd ms | x matmul | x mm+k | peak extra MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for V in vocab:
        h = torch.randn(1, M, H, device="cuda").bfloat16().requires_grad_()
        w = (torch.randn(V, H, device="cuda") / H**0.5).bfloat16().requires_grad_()
        tg = torch.randint(0, V, (1, M), device="cuda")
        mk = torch.ones(1, M, dtype=torch.bool, device="cuda")

        step, peak = _linear_step(h, w, tg, mk)
        t_mm = cuda_time(functools.partial(step, "matmul"), reps)
        t_mk = cuda_time(functools.partial(step, "matmul+kernel"), reps)
        for name, t, mem in (
            ("matmul", t_mm, peak("matmul")),
            ("matmul+kernel", t_mk, peak("matmul+kernel")),
        ):
            print(
                f"| {V} | {name} | - | - | - | {t * 1e3:.1f} | {t / t_mm:.2f} | {t / t_mk:.2f} | {mem:.0f} |",
                flush=True,
            )
        for ct, cv, keep in CHUNKS:
            t = cuda_time(functools.partial(step, "fused", ct, cv, keep), reps)
            mem = peak("fused", ct, cv, keep)
            print(
                f"| {V} | fused-linear | {ct} | {cv} | {keep} | {t * 1e3:.1f} | {t / t_mm:.2f} | {t / t_mk:.2f} | {mem:.0f} |",
                flush=True,
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip", nargs="*", default=[], choices=["launch", "chunks"])
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()} torch={torch.__version__} copy bandwidth {bw / 1e9:.0f} GB/s")
    T = min(a.seq, a.tokens)
    if "launch" not in a.skip:
        sweep_launch(a.tokens // T, T, a.vocab, bw, a.reps)
    if "chunks" not in a.skip:
        sweep_chunks(a.tokens, a.hidden, a.vocab, a.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
