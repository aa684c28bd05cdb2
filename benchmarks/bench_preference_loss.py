"""Benchmark: forward+backward time and peak extra memory of the preference-loss log-prob path.

Contenders (all followed by the same cheap loss head: SFT on chosen rows + DPO on pairs):

* ``naive``            fp32 ``log_softmax`` over [N,T,V] + gather (autograd), the baseline;
* ``chunked``          msl_ds.kernels chunked PyTorch path (``backend="torch"``);
* ``chunked-inplace``  same with ``inplace_backward=True`` (grad written into the logits buffer);
* ``triton`` / ``triton-inplace``  Triton kernels (CUDA only);
* ``naive-linear``     ``hidden @ W.T`` then naive (baseline of the fused-linear rows);
* ``matmul+kernel``    ``hidden @ W.T`` then the in-place logits kernel (Triton on CUDA, chunked on
                       CPU): the fused-linear variant's time target (<= 1.3x) is against this row;
* ``fused-linear``     msl_ds.kernels.fused_linear_sequence_logprobs (never builds logits; Triton
                       block kernels on CUDA);
* ``fused-linear-torch``  the same with ``backend="torch"`` (CUDA only; on CPU it is ``fused-linear``);
* ``fused-linear-keep<K>``  ``fused-linear`` with ``keep_blocks=K`` (asked for by name only);
* ``liger-dpo``        Liger-Kernel ``LigerFusedLinearDPOLoss`` (reference-free, when installed).

Library baselines (per-row answer log-probs, then the same loss head):

* ``torch-ce``         ``F.cross_entropy(reduction="none")`` in the logits' own dtype (the bf16 rows
                       are the bf16 cross-entropy baseline: no fp32 upcast of [N,T,V]);
* ``trl-selective``    TRL's ``selective_log_softmax`` (``trl.trainer.utils``), what its trainers use;
* ``liger-ce``         Liger-Kernel ``LigerCrossEntropyLoss(reduction="none")`` (Triton: CUDA only);
* ``liger-flce``       Liger-Kernel ``LigerFusedLinearCrossEntropyLoss(reduction="none")`` (linear row,
                       CUDA only).

A contender that cannot run here (Liger on a CPU, TRL not installed) is skipped with the reason printed.

Run-to-run spread: every contender is timed in ``--runs`` separate runs (fresh processes on CPU),
each the median of ``--reps`` steps; the table shows the median of the runs with their min–max.

Ratios: logit-based rows are relative to ``naive``; linear rows to ``naive-linear``; the
``x mm+k`` column relates ``fused-linear`` to ``matmul+kernel``.

Bandwidth floor (logit rows): the logits must be read once forward and read and written once
backward, 3·N·T·V·elem bytes; ``floor ms`` divides that by the copy bandwidth measured in the
same run (``dst.copy_(src)`` on a 1 GiB (CUDA) / 256 MiB (CPU) buffer, 2 bytes moved per byte
copied), and ``x floor`` is the row's time over it.

Working memory (linear rows): ``work MiB`` = peak extra minus the gradients the step must
return (d hidden, d W); for ``fused-linear`` it grows with N·T, not N·T·V.

Memory ("extra" = peak during one fwd+bwd minus memory held right before it, i.e. after the
inputs exist; it includes gradient buffers such as d logits / d W that the step allocates):

* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats`` minus
  ``memory_allocated()`` before the step.
* CPU (``--cpu``): every (contender, shape, dtype) runs in a fresh subprocess with a fixed
  glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_``; large buffers are mmap'd and returned to the
  OS on free), after one warm-up step, ``gc`` and ``malloc_trim(0)``; the kernel's peak-RSS
  counter is reset through ``/proc/self/clear_refs`` ("5") and extra = ``VmHWM`` after the
  step minus ``VmRSS`` before it.  (tracemalloc cannot see torch's allocations.)

Examples::

    python benchmarks/bench_preference_loss.py --cpu                      # 2k tokens, V=32k, fp32+bf16
    python benchmarks/bench_preference_loss.py                            # GPU: 16k tokens, V=32k,128k, bf16
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

LOGIT_ROWS = [
    "naive",
    "chunked",
    "chunked-inplace",
    "triton",
    "triton-inplace",
    "torch-ce",
    "trl-selective",
    "liger-ce",
]
LINEAR_ROWS = ["naive-linear", "matmul+kernel", "fused-linear", "fused-linear-torch", "liger-dpo", "liger-flce"]
CUDA_ONLY = {  # Liger's Triton kernels (its chunked DPO loss is plain torch and runs on a CPU)
    "liger-ce": "Liger-Kernel's cross-entropy is a Triton kernel (CUDA only)",
    "liger-flce": "Liger-Kernel's fused linear cross-entropy is a Triton kernel (CUDA only)",
}


# ----------------------------------------------------------------------------- memory helpers (CPU)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


# ----------------------------------------------------------------------------- one measurement


def _build(spec: dict):
    import torch

    from msl_ds.kernels import ROLE_GOLD, ROLE_IGNORE, LossConfig

    dev = torch.device(spec["device"])
    dt = getattr(torch, spec["dtype"])
    N, T, V, H = spec["N"], spec["T"], spec["V"], spec["H"]
    g = torch.Generator(device="cpu").manual_seed(0)
    targets = torch.randint(0, V, (N, T), generator=g).to(dev)
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[:, : int(spec["prompt_frac"] * T)] = False
    mask = mask.to(dev)
    B = N // 2
    roles = torch.tensor([ROLE_GOLD] * B + [ROLE_IGNORE] * (N - B), device=dev)
    ref = torch.full((N,), -float(T), device=dev)
    ci, ri = torch.arange(B, device=dev), torch.arange(B, 2 * B, device=dev)
    cfg = LossConfig(nll_weight=1.0, dpo=1.0, paired_beta=0.1)
    inp = dict(targets=targets, mask=mask, roles=roles, ref=ref, ci=ci, ri=ri, cfg=cfg)
    # random data drawn where it will live (a CPU generator for 16k x 128k would take minutes)
    gd = g if dev.type == "cpu" else torch.Generator(device=dev).manual_seed(0)
    if spec["contender"] in LOGIT_ROWS:
        logits = torch.empty(N, T, V, dtype=dt, device=dev)
        for n in range(N):  # fill row by row: no full-size fp32 temporary
            logits[n] = torch.randn(T, V, generator=gd, dtype=torch.float32, device=dev).to(dt) * 2
        inp["logits"] = logits.requires_grad_()
    else:
        inp["hidden"] = torch.randn(N, T, H, generator=gd, device=dev).to(dt).requires_grad_()
        inp["weight"] = (torch.randn(V, H, generator=gd, device=dev) / H**0.5).to(dt).requires_grad_()
    return inp


def _sink(x):
    """Identity whose backward *drops* the incoming gradient.

    Stands in for the model's lm_head matmul, which consumes d logits in its backward:
    without it, AccumulateGrad on the benchmark's leaf logits would keep (or even copy)
    the gradient and distort the measurement.
    """
    import torch

    class _Sink(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            return None

    return _Sink.apply(x)


def _step(spec: dict, inp: dict) -> None:

    from msl_ds.kernels import (
        fused_linear_sequence_logprobs,
        naive_sequence_logprobs,
        preference_loss_from_logps,
        sequence_logprobs,
    )

    c = spec["contender"]
    t, m = inp["targets"], inp["mask"]
    if c == "liger-dpo":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        lab = t.masked_fill(~m, -100)
        fn = LigerFusedLinearDPOLoss(
            beta=0.1, compute_nll_loss=True, use_ref_model=False, compiled=spec["device"] != "cpu"
        )
        out = fn(inp["weight"], inp["hidden"], lab)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return
    if c == "liger-flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        H = inp["hidden"].shape[-1]
        ce = LigerFusedLinearCrossEntropyLoss(reduction="none")(
            inp["weight"], inp["hidden"].reshape(-1, H), t.masked_fill(~m, -100).reshape(-1)
        )
        logps, n = -(ce.view(t.shape) * m).sum(1).float(), m.sum(1).float()
    elif c in ("torch-ce", "liger-ce", "trl-selective"):
        x = _sink(inp["logits"])
        V = x.shape[-1]
        if c == "trl-selective":
            from trl.trainer.utils import selective_log_softmax

            tok = selective_log_softmax(x, t)
        elif c == "torch-ce":
            import torch.nn.functional as F

            tok = -F.cross_entropy(x.reshape(-1, V), t.reshape(-1), reduction="none").view(t.shape)
        else:
            from liger_kernel.transformers import LigerCrossEntropyLoss

            tok = -LigerCrossEntropyLoss(reduction="none")(x.reshape(-1, V), t.reshape(-1)).view(t.shape)
        logps, n = (tok.float() * m).sum(1), m.sum(1).float()
    elif c in ("naive", "naive-linear"):
        x = _sink(inp["logits"]) if c == "naive" else inp["hidden"] @ inp["weight"].T
        logps, n = naive_sequence_logprobs(x, t, m)
    elif c == "matmul+kernel":
        x = inp["hidden"] @ inp["weight"].T
        backend = "triton" if spec["device"] == "cuda" else "torch"
        logps, n = sequence_logprobs(x, t, m, backend=backend, inplace_backward=True)
    elif c in ("chunked", "chunked-inplace", "triton", "triton-inplace"):
        inplace = c.endswith("inplace")
        x = _sink(inp["logits"])  # non-leaf alias, like the output of the lm_head
        logps, n = sequence_logprobs(
            x, t, m, backend="torch" if c.startswith("chunked") else "triton", inplace_backward=inplace
        )
    elif c.startswith("fused-linear"):
        backend = "torch" if c.endswith("torch") else "auto"
        keep = int(c.split("-keep")[1]) if "-keep" in c else 0
        logps, n = fused_linear_sequence_logprobs(inp["hidden"], inp["weight"], t, m, backend=backend, keep_blocks=keep)
    else:
        raise ValueError(c)
    loss, _ = preference_loss_from_logps(
        logps, n, inp["roles"], inp["ref"], inp["cfg"], chosen_idx=inp["ci"], rejected_idx=inp["ri"]
    )
    loss.backward()


def _clear_grads(inp: dict) -> None:
    for k in ("logits", "hidden", "weight"):
        if k in inp:
            inp[k].grad = None


def measure(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    cuda = spec["device"] == "cuda"
    inp = _build(spec)
    _step(spec, inp)  # warm-up (lazy init, Triton compile)
    _clear_grads(inp)
    gc.collect()
    what = spec.get("what", "both")
    extra = None
    if what == "time":
        pass
    elif cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(spec, inp)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        _malloc_trim()
        if not _reset_peak_rss():
            raise RuntimeError("/proc/self/clear_refs not writable: cannot measure CPU peak memory")
        base = _proc_status_kib("VmRSS")
        _step(spec, inp)
        extra = (_proc_status_kib("VmHWM") - base) * 1024
    times = []
    for _ in range(spec["reps"] if what != "mem" else 0):
        _clear_grads(inp)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _step(spec, inp)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"time_s": statistics.median(times) if times else None, "extra_bytes": extra}
    if cuda and spec.get("profile"):
        try:
            out.update(gpu_busy(spec, inp))
        except Exception as e:  # noqa: BLE001 - the profiler is optional; keep the timing
            print(f"profiler failed: {e}", file=sys.stderr)
    return out


def gpu_busy(spec: dict, inp: dict) -> dict:
    """One more step under torch.profiler: summed kernel time and number of kernels.

    A step whose fwd+bwd time is far above its busy time is bound by host-side launches
    (Python, dispatcher), not by the GPU.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    _clear_grads(inp)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _step(spec, inp)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if str(e.device_type).endswith("CUDA")]
    return {"busy_s": sum(e.time_range.elapsed_us() for e in kernels) / 1e6, "kernels": len(kernels)}


def measure_cuda(spec: dict) -> dict:
    """CUDA: measure in this process; a failing contender (e.g. out of memory) becomes an error row."""
    import torch

    try:
        return measure(spec)
    except Exception as e:  # noqa: BLE001 - report and go on with the next contender
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def copy_bandwidth(device: str, reps: int) -> float:
    """Achievable memory bandwidth in bytes/s: ``dst.copy_(src)`` moves 2 bytes per byte copied."""
    import torch

    nbytes = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    times = []
    for _ in range(max(reps, 3)):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def _subprocess(spec: dict, env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_isolated(spec: dict) -> dict:
    """CPU: memory in one fresh process (fixed mmap threshold), timing in another (default malloc,
    so that the mmap/munmap + page-fault cost of the memory run does not distort the timings)."""
    base_env = dict(os.environ, PYTHONWARNINGS="ignore")
    mem = _subprocess(dict(spec, what="mem"), dict(base_env, MALLOC_MMAP_THRESHOLD_="131072"))
    if "error" in mem:
        return mem
    runs = []
    for _ in range(spec.get("runs", 1)):
        tim = _subprocess(dict(spec, what="time"), base_env)
        if "error" in tim:
            return tim
        runs.append(tim["time_s"])
    return {**spread(runs), "extra_bytes": mem["extra_bytes"]}


def spread(runs: list[float]) -> dict:
    """The median of the runs' times, with their min and max."""
    return {"time_s": statistics.median(runs), "time_min": min(runs), "time_max": max(runs), "runs": len(runs)}


def measure_cuda_runs(spec: dict) -> dict:
    """CUDA: ``spec["runs"]`` measurements in this process (memory from the first)."""
    out = measure_cuda(spec)
    if "error" in out:
        return out
    runs = [out["time_s"]] + [
        measure_cuda(dict(spec, what="time")).get("time_s") for _ in range(spec.get("runs", 1) - 1)
    ]
    if any(r is None for r in runs):
        return {"error": "a repeated run failed"}
    return {**out, **spread(runs)}


# ----------------------------------------------------------------------------- driver


def _fmt(row: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    return format(row[key] * scale, fmt) if key in row else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="CPU mode with small default shapes")
    ap.add_argument("--tokens", type=int, default=None, help="N*T (default 2048 CPU / 16384 GPU)")
    ap.add_argument("--seq", type=int, default=512, help="T (N = tokens // T, must be even)")
    ap.add_argument("--vocab", type=int, nargs="+", default=None, help="default 32000 CPU / 32000 128256 GPU")
    ap.add_argument("--hidden", type=int, default=None, help="H for linear rows (default 256 CPU / 4096 GPU)")
    ap.add_argument("--dtypes", nargs="+", default=None, help="default float32 bfloat16 (CPU) / bfloat16 (GPU)")
    ap.add_argument(
        "--linear-dtypes",
        nargs="+",
        default=None,
        help="dtypes for the linear rows (default: float32 only with --cpu, because bf16 matmul has no "
        "hardware support on typical CI CPUs and is ~40x slower than fp32; else same as --dtypes)",
    )
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--runs", type=int, default=3, help="separate timing runs per contender (median, min-max shown)")
    ap.add_argument("--prompt-frac", type=float, default=0.0, help="fraction of each row that is masked prompt")
    ap.add_argument("--contenders", nargs="+", default=None)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1 with --cpu, robust on a shared 2-core box; else torch default)",
    )
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="CUDA: add 'busy ms' (summed kernel time of one step, torch.profiler) and the kernel count",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(measure(json.loads(a.worker))))
        return 0

    import torch

    cuda = (not a.cpu) and torch.cuda.is_available()
    if not a.cpu and not cuda:
        print("no CUDA device: use --cpu", file=sys.stderr)
        return 2
    tokens = a.tokens or (2048 if a.cpu else 16384)
    vocab = a.vocab or ([32000] if a.cpu else [32000, 128256])
    H = a.hidden or (256 if a.cpu else 4096)
    dtypes = a.dtypes or (["float32", "bfloat16"] if a.cpu else ["bfloat16"])
    linear_dtypes = a.linear_dtypes or (["float32"] if a.cpu else dtypes)
    reps = a.reps or (3 if a.cpu else 10)
    if a.cpu and a.threads is None:
        a.threads = 1
    T = min(a.seq, tokens)
    N = tokens // T
    assert N % 2 == 0, "N = tokens // seq must be even (chosen/rejected halves)"
    have_triton = cuda
    import importlib.util

    have_liger = importlib.util.find_spec("liger_kernel") is not None
    have_trl = importlib.util.find_spec("trl") is not None
    skipped = {}
    for c in LOGIT_ROWS + LINEAR_ROWS:
        if c.startswith("liger") and not have_liger:
            skipped[c] = "liger-kernel is not installed"
        elif c in CUDA_ONLY and not cuda:
            skipped[c] = CUDA_ONLY[c]
        elif c.startswith("trl") and not have_trl:
            skipped[c] = "trl is not installed"
    contenders = a.contenders or [
        c
        for c in LOGIT_ROWS + LINEAR_ROWS
        if (have_triton or not c.startswith("triton")) and c not in skipped and (cuda or c != "fused-linear-torch")
    ]
    for c, why in skipped.items():
        print(f"# skipped {c}: {why}")
    print(
        f"# device={'cuda:' + torch.cuda.get_device_name() if cuda else 'cpu'} threads={a.threads or torch.get_num_threads()} "
        f"N={N} T={T} tokens={tokens} H={H} prompt_frac={a.prompt_frac} reps={reps} torch={torch.__version__}"
    )
    bw = copy_bandwidth("cuda" if cuda else "cpu", reps)
    print(f"# copy bandwidth {bw / 1e9:.1f} GB/s (floor = 3·N·T·V·elem bytes at this rate)")
    rows = []
    for V in vocab:
        for dt in dtypes:
            res = {}
            for c in contenders:
                linear = c in LINEAR_ROWS or c.startswith("fused-linear")
                if linear and dt not in linear_dtypes:
                    continue
                spec = dict(
                    contender=c,
                    device="cuda" if cuda else "cpu",
                    dtype=dt,
                    N=N,
                    T=T,
                    V=V,
                    H=H,
                    reps=reps,
                    prompt_frac=a.prompt_frac,
                    threads=a.threads,
                    profile=a.profile,
                    runs=a.runs,
                )
                r = run_isolated(spec) if not cuda else measure_cuda_runs(spec)
                res[c] = r
                base = res.get("naive" if c in LOGIT_ROWS else "naive-linear", {})
                row = dict(V=V, dtype=dt, contender=c, **r)
                if "error" not in r and base and "error" not in base:
                    row["time_ratio"] = r["time_s"] / base["time_s"]
                    row["mem_ratio"] = r["extra_bytes"] / max(base["extra_bytes"], 1)
                elem = torch.empty((), dtype=getattr(torch, dt)).element_size()
                if "error" not in r and c in LOGIT_ROWS:
                    row["floor_s"] = 3 * N * T * V * elem / bw
                    row["floor_ratio"] = r["time_s"] / row["floor_s"]
                if "error" not in r and linear:
                    row["work_bytes"] = r["extra_bytes"] - (N * T * H + V * H) * elem
                mk = res.get("matmul+kernel", {})
                if c.startswith("fused-linear") and "error" not in r and mk and "error" not in mk:
                    row["mmk_ratio"] = r["time_s"] / mk["time_s"]
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    hdr = (
        f"| V | dtype | contender | fwd+bwd ms, median of {a.runs} runs (min–max) | x naive | floor ms | x floor | x mm+k "
        "| peak extra MiB | x naive | work MiB |"
    )
    if a.profile:
        hdr += " busy ms | kernels |"
    print(hdr)
    print("|" + "---|" * (13 if a.profile else 11))
    for r in rows:
        if "error" in r:
            print(f"| {r['V']} | {r['dtype']} | {r['contender']} | error: {r['error'][:60]} |" + " |" * 7)
            continue

        print(
            f"| {r['V']} | {r['dtype']} | {r['contender']} | {r['time_s'] * 1e3:.1f} "
            f"({_fmt(r, 'time_min', '.1f', 1e3)}–{_fmt(r, 'time_max', '.1f', 1e3)}) | {_fmt(r, 'time_ratio', '.2f')} "
            f"| {_fmt(r, 'floor_s', '.2f', 1e3)} | {_fmt(r, 'floor_ratio', '.2f')} | {_fmt(r, 'mmk_ratio', '.2f')} "
            f"| {r['extra_bytes'] / 2**20:.1f} | {_fmt(r, 'mem_ratio', '.3f')} | {_fmt(r, 'work_bytes', '.1f', 2**-20)} |"
            + (f" {_fmt(r, 'busy_s', '.2f', 1e3)} | {r.get('kernels', '-')} |" if a.profile else "")
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
