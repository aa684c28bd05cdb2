"""Scale model: per-rank memory and time per phase of one msl_ds stage at 8B and 70B.

Usage::

    python benchmarks/scale_model.py                       # 8B and 70B on 8, 16, 64 H100-80GB
    python benchmarks/scale_model.py --gpus 8 16 --facts 20000 --markdown
    python benchmarks/scale_model.py --calibrate            # also print the CPU calibration (see below)

Everything here is arithmetic over the formulas the code implies (docs/SCALE.md derives each
one); nothing is measured on a GPU. The model assumes the shipped GPU settings
(``ds_configs/run_gpu_8b.yaml`` + ``ds_configs/zero3_gpu.json``): bf16 weights under ZeRO-3 with
fp32 master weights and Adam, ``train.logprobs=fused_linear``, gradient checkpointing, a token
budget per forward, HF ``generate`` for the probe, augmentation and evaluation.

Phases of a stage (launch/train.py ``run_stage``):

* ``train``: forward+backward+step over the stage's rows; compute at an assumed MFU, ZeRO-3's
  parameter all-gathers (forward, backward, recompute) and gradient reduce-scatters per forward,
  overlapped with compute (``overlap_comm``): a step takes the larger of the two.
* ``probe``: greedy + K sampled answers per fact, the subject descriptions, then one forward
  over gold + candidate rows for the reference log-probs.
* ``augmentation``: paraphrases, expansions (per fact) and background texts (per subject).
* ``evaluation``: pre-evaluation of the stage's questions and evaluation of every stage test set
  so far plus retain and general (the numbers are for the stage's last stage, the largest).
* ``export``: per-parameter gather to rank 0 (host RAM) and a safetensors write.
* ``checkpoint``: the DeepSpeed checkpoint at the stage's end (and every ``save_every_steps``).

Generation is decode-bound: a decode step reads the full weights once (gathered mode: from HBM;
synced mode, when they do not fit: all-gathered layer by layer over the network, every token),
plus a fixed per-step overhead of HF ``generate`` (Python, sampling, KV-cache bookkeeping).

Calibration (``--calibrate``, CPU, this machine): the fused-linear / logits working-memory
formulas against ``benchmarks/bench_preference_loss.py`` measurements (docs/PERF.md), and the
cost of the DONE.json fingerprint against a full SHA-256 (``msl_ds.io``), measured here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, not an installed copy

GB = 1e9
GIB = float(1 << 30)


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> float:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return 2 * h * h + 2 * h * kv + 3 * h * self.intermediate + 2 * h

    @property
    def params(self) -> float:
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden + self.hidden


LLAMA3_8B = Model("Llama-3-8B", 32, 4096, 14336, 32, 8, 128256)
LLAMA3_70B = Model("Llama-3-70B", 80, 8192, 28672, 64, 8, 128256)


@dataclass(frozen=True)
class Hardware:
    name: str = "H100-SXM-80GB"
    hbm_gb: float = 80.0
    hbm_tbps: float = 3.35  # HBM bandwidth, TB/s
    peak_tflops: float = 989.0  # dense bf16
    gpus_per_node: int = 8
    intra_gbps: float = 360.0  # NCCL all-gather bus bandwidth inside a node (NVLink 4), GB/s per GPU
    inter_gbps: float = 40.0  # across nodes (8 x 400 Gb/s InfiniBand per node, effective), GB/s per GPU
    disk_gbps_per_node: float = 2.0  # sustained write of a node to the shared checkpoint store, GB/s
    host_ram_gb: float = 1000.0  # per node


@dataclass(frozen=True)
class Workload:
    """One stage of an msl run, sized like a real knowledge-update stage (settings: run_gpu_8b.yaml)."""

    facts: int = 10_000  # training facts of the stage
    subjects_per_fact: float = 1 / 3  # distinct subjects per fact (backgrounds are per subject)
    samples: int = 6  # pbl.samples
    candidates: float = 4.0  # distinct candidates kept per fact (of 1 greedy + 6 samples)
    paraphrase: int = 2  # augment.paraphrase
    expansion: int = 1  # augment.expansion
    epochs: int = 3  # train.epochs
    row_tokens: float = 64.0  # mean padded tokens of a question/answer row
    background_tokens: float = 256.0  # mean padded tokens of a background or rehearsal row
    prompt_tokens: float = 48.0  # mean prompt of a generate call
    new_tokens_answer: int = 32  # pbl / eval max_new_tokens
    new_tokens_question: int = 64  # augment.max_new_tokens
    new_tokens_background: int = 128  # augment.background_max_new_tokens (and pbl.subject_max_new_tokens)
    gen_batch: int = 256  # prompts per generate call
    eval_questions: int = 2_000  # test questions per stage set
    stages_seen: int = 8  # stage test sets evaluated at the last stage (0 .. 7)
    retain_general: int = 3_000  # retain + general questions
    groups_per_step: int = 128  # micro_batch_size x grad_accum x 8 GPUs (run_gpu_8b.yaml)
    tokens_per_forward: int = 16_384  # train.max_tokens_per_micro_batch
    save_every_steps: int = 200  # mid-stage checkpoints
    mfu_train: float = 0.40  # assumed model-FLOPs utilisation of training (the target)
    mfu_forward: float = 0.50  # reference log-probs (forward only, large batches)
    gen_step_overhead_s: float = 0.025  # HF generate's fixed cost per decode step
    gather_max_gib: float = 24.0  # GiB left for a gathered copy (run_gpu_8b.yaml measures it: eval.gather_max_gib=auto)


def train_rows(w: Workload) -> tuple[float, float]:
    """(rows, padded tokens) trained per stage: gold + candidates + augmentations + backgrounds, x epochs."""
    qa = w.facts * (1 + w.candidates + w.paraphrase + w.expansion)
    bg = 2 * w.facts * w.subjects_per_fact  # background-integrated questions and rehearsal texts
    return (qa + bg) * w.epochs, (qa * w.row_tokens + bg * w.background_tokens) * w.epochs


def memory(m: Model, hw: Hardware, w: Workload, gpus: int) -> dict[str, float]:
    """Per-rank GPU memory in GB by component, for training and for generation."""
    N = m.params
    states = 18 * N / gpus  # bf16 params (2) + fp32 grad partition (4) + fp32 master (4) + Adam m, v (8)
    live = 2 * (2 * m.layer_params) + 2 * m.vocab * m.hidden  # two layers in flight + the gathered lm-head
    buckets = 2 * 2 * 2e8  # reduce bucket + prefetch bucket (2e8 elements, bf16)
    T = w.tokens_per_forward
    per_layer = 2 * (10 * m.hidden + 4 * m.intermediate)  # bytes per token of one layer's activations
    act_ckpt = T * (m.layers * 2 * m.hidden + 2 * per_layer)  # layer inputs + one layer recomputed (+ its grads)
    act_full = T * m.layers * per_layer
    logits = T * m.vocab * 2  # bf16 [tokens, V]; the kernel's backward writes d logits in place
    ct = min(T, 16384)
    fused = ct * 16384 * 2 + T * m.hidden * (4 + 2) + 16384 * m.hidden * 4 + m.vocab * m.hidden * 2
    kv = w.gen_batch * (w.prompt_tokens + w.new_tokens_background) * m.layers * 2 * m.kv_heads * m.head_dim * 2
    full = 2 * N
    gathered = full <= w.gather_max_gib * GIB
    return {
        "states": states / GB,
        "live_params": (live + buckets) / GB,
        "act_ckpt": act_ckpt / GB,
        "act_no_ckpt": act_full / GB,
        "logits_path": logits / GB,
        "fused_path": fused / GB,
        "train_total": (states + live + buckets + act_ckpt + fused) / GB,
        "train_total_logits_no_ckpt": (states + live + buckets + act_full + logits) / GB,
        "gen_weights": (full if gathered else live) / GB,
        "gen_kv": kv / GB,
        "gen_total": (states + (full if gathered else live) + kv) / GB,
        "gathered": float(gathered),
        "host_export_rank0": full / GB,
        "checkpoint_total": 14 * N / GB,  # bf16 module states (2) + fp32 master, m, v (12), all ranks together
    }


def _allgather_bw(hw: Hardware, gpus: int) -> float:
    return (hw.intra_gbps if gpus <= hw.gpus_per_node else hw.inter_gbps) * GB


def _decode_time(m: Model, hw: Hardware, w: Workload, gpus: int, prompts: float, new_tokens: int) -> float:
    """Seconds to generate ``new_tokens`` for ``prompts`` prompts spread over the ranks."""
    N = m.params
    per_rank = math.ceil(prompts / gpus)
    calls = math.ceil(per_rank / w.gen_batch)
    b = min(per_rank, w.gen_batch)
    gathered = 2 * N <= w.gather_max_gib * GIB
    if gathered:
        read = 2 * N / (hw.hbm_tbps * 1e12)
        compute = 2 * N * b / (hw.peak_tflops * 1e12 * 0.5)
        step = max(read, compute) + w.gen_step_overhead_s
        once = 2 * N * (gpus - 1) / gpus / _allgather_bw(hw, gpus)  # the weights gathered once per phase
    else:  # synced: every decode step gathers every layer over the network
        step = 2 * N * (gpus - 1) / gpus / _allgather_bw(hw, gpus) + w.gen_step_overhead_s
        calls = math.ceil(prompts / (w.gen_batch * gpus))  # all ranks decode together
        once = 0.0
    return calls * new_tokens * step + once


def phase_times(m: Model, hw: Hardware, w: Workload, gpus: int) -> dict[str, float]:
    """Seconds per phase of one stage."""
    N = m.params
    rows, tokens = train_rows(w)
    seq = w.row_tokens
    flops_tok = 6 * N + 12 * m.layers * m.hidden * seq
    compute = tokens * flops_tok * (8 / 6) / (gpus * hw.peak_tflops * 1e12 * w.mfu_train)  # + recompute
    forwards = tokens / gpus / w.tokens_per_forward  # per rank
    bw = _allgather_bw(hw, gpus)
    comm = forwards * (3 * 2 * N + 2 * N) * (gpus - 1) / gpus / bw  # gathers fwd/bwd/recompute + reduce-scatter
    train = max(compute, comm)
    F, S = w.facts, w.facts * w.subjects_per_fact
    probe_gen = _decode_time(m, hw, w, gpus, F * (1 + w.samples), w.new_tokens_answer)
    probe_gen += _decode_time(m, hw, w, gpus, S, w.new_tokens_background)
    ref_tokens = F * (1 + w.candidates) * w.row_tokens
    probe_fwd = ref_tokens * 2 * N / (gpus * hw.peak_tflops * 1e12 * w.mfu_forward)
    probe_fwd += ref_tokens / gpus / w.tokens_per_forward * 2 * N * (gpus - 1) / gpus / bw
    aug = _decode_time(m, hw, w, gpus, F * (w.paraphrase + w.expansion), w.new_tokens_question)
    aug += _decode_time(m, hw, w, gpus, S, w.new_tokens_background)
    questions = w.eval_questions * (1 + w.stages_seen) + w.retain_general
    evaluation = _decode_time(m, hw, w, gpus, questions, w.new_tokens_answer)
    export = 2 * N / bw + 2 * N / (hw.disk_gbps_per_node * GB)  # gather to rank 0, one node writes
    nodes = max(1, gpus // hw.gpus_per_node)
    steps = rows / w.groups_per_step / (1 + w.candidates)  # groups of (gold + candidates)
    n_ckpt = 1 + int(steps // w.save_every_steps)
    checkpoint = n_ckpt * 14 * N / (nodes * hw.disk_gbps_per_node * GB)
    return {
        "train": train,
        "train_compute": compute,
        "train_comm": comm,
        "probe": probe_gen + probe_fwd,
        "augmentation": aug,
        "evaluation": evaluation,
        "export": export,
        "checkpoint": checkpoint,
    }


PHASES = ("train", "probe", "augmentation", "evaluation", "export", "checkpoint")


def breaks(m: Model, hw: Hardware, w: Workload, gpus: int, mem: dict[str, float], t: dict[str, float]) -> list[str]:
    """Where this configuration fails or degrades, in words."""
    out = []
    cap = 0.9 * hw.hbm_gb
    if mem["train_total"] > cap:
        out.append(f"training OOM: {mem['train_total']:.0f} GB > {cap:.0f} GB usable")
    if mem["train_total_logits_no_ckpt"] > cap:
        out.append(f"without fused_linear + checkpointing: {mem['train_total_logits_no_ckpt']:.0f} GB (OOM)")
    if not mem["gathered"]:
        out.append(f"generation synced (2N = {2 * m.params / GIB:.0f} GiB > gather_max_gib): per-token all-gathers")
    elif mem["gen_total"] > cap:
        out.append(f"gathered generation OOM: {mem['gen_total']:.0f} GB")
    if t["train_comm"] > t["train_compute"]:
        out.append(f"training comm-bound ({t['train_comm'] / t['train_compute']:.1f}x compute): hpZ / larger forwards")
    if mem["host_export_rank0"] > 0.8 * hw.host_ram_gb:
        out.append(f"export: rank 0 holds {mem['host_export_rank0']:.0f} GB in host RAM")
    return out


def table(models, gpus_list, hw: Hardware, w: Workload) -> str:
    lines = [
        "| model | GPUs | train GB/rank | gen GB/rank | logits / fused GB | "
        + " | ".join(f"{p} h" for p in PHASES)
        + " | total h | dominant | breaks |",
        "|---|---|---|---|---|" + "---|" * len(PHASES) + "---|---|---|",
    ]
    for m in models:
        for g in gpus_list:
            mem = memory(m, hw, w, g)
            t = phase_times(m, hw, w, g)
            total = sum(t[p] for p in PHASES)
            dom = max(PHASES, key=lambda p: t[p])
            br = "; ".join(breaks(m, hw, w, g, mem, t)) or "-"
            lines.append(
                f"| {m.name} | {g} | {mem['train_total']:.1f} | {mem['gen_total']:.1f} | "
                f"{mem['logits_path']:.2f} / {mem['fused_path']:.2f} | "
                + " | ".join(f"{t[p] / 3600:.2f}" for p in PHASES)
                + f" | {total / 3600:.1f} | {dom} ({100 * t[dom] / total:.0f}%) | {br} |"
            )
    return "\n".join(lines)


def memory_table(models, gpus_list, hw: Hardware, w: Workload) -> str:
    keys = ("states", "live_params", "act_ckpt", "act_no_ckpt", "logits_path", "fused_path", "gen_weights", "gen_kv")
    lines = ["| model | GPUs | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for m in models:
        for g in gpus_list:
            mem = memory(m, hw, w, g)
            lines.append(f"| {m.name} | {g} | " + " | ".join(f"{mem[k]:.2f}" for k in keys) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CPU calibration


def fused_cpu_formula(tokens: int, V: int, H: int, chunk_tokens: int = 1024, chunk_vocab: int = 8192) -> float:
    """Peak extra MiB of the fused-linear torch backend in fp32 (the bench's ``fused-linear`` row):
    d W, d hidden and its fp32 accumulator, one logit block and its d z, and the per-vocab-chunk
    d W accumulator when the tokens take more than one chunk (else d W is written directly)."""
    acc_w = chunk_vocab * H if tokens > chunk_tokens else 0
    b = 4 * (V * H + 2 * tokens * H + acc_w + 2 * min(tokens, chunk_tokens) * chunk_vocab)
    return b / (1 << 20)


def logits_cpu_formula(tokens: int, V: int, H: int) -> float:
    """Peak extra MiB of ``matmul+kernel`` in fp32: the logits (d logits written into them in
    place, the fp32 chunk computed in the output rows), d W and d hidden."""
    return 4 * (tokens * V + V * H + tokens * H) / (1 << 20)


def hash_calibration(size_mib: int = 512) -> dict[str, float]:
    """Seconds to fingerprint (size + first/last MiB) vs SHA-256 a ``size_mib`` file, measured here."""
    from msl_ds.io import fingerprint, sha256

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "shard.bin")
        with open(p, "wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(1 << 20))
        t0 = time.perf_counter()
        sha256(p)
        t1 = time.perf_counter()
        fingerprint(p)
        t2 = time.perf_counter()
    return {
        "size_mib": size_mib,
        "sha256_s": t1 - t0,
        "fingerprint_s": t2 - t1,
        "sha256_gbps": size_mib / 1024 / (t1 - t0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 64])
    ap.add_argument("--models", nargs="+", default=["8b", "70b"], choices=["8b", "70b"])
    ap.add_argument("--facts", type=int, default=Workload.facts)
    ap.add_argument("--tokens-per-forward", type=int, default=Workload.tokens_per_forward)
    ap.add_argument("--gather-max-gib", type=float, default=Workload.gather_max_gib)
    ap.add_argument("--hbm-gb", type=float, default=Hardware.hbm_gb, help="80 (H100) or 141 (H200)")
    ap.add_argument(
        "--calibrate", action="store_true", help="also run the CPU calibration (writes a 512 MiB temp file)"
    )
    a = ap.parse_args()
    models = [{"8b": LLAMA3_8B, "70b": LLAMA3_70B}[k] for k in a.models]
    w = dataclasses.replace(
        Workload(), facts=a.facts, tokens_per_forward=a.tokens_per_forward, gather_max_gib=a.gather_max_gib
    )
    hw = dataclasses.replace(Hardware(), hbm_gb=a.hbm_gb)
    for m in models:
        print(f"{m.name}: {m.params / 1e9:.2f}B parameters")
    rows, tokens = train_rows(w)
    print(f"workload: {w.facts} facts/stage -> {rows:,.0f} trained rows, {tokens / 1e6:.1f}M padded tokens per stage\n")
    print("Per-rank memory (GB):\n")
    print(memory_table(models, a.gpus, hw, w))
    print("\nTime per phase of one stage (hours) and where it breaks:\n")
    print(table(models, a.gpus, hw, w))
    if a.calibrate:
        print("\nCPU calibration:")
        for V in (32000, 128256):
            print(
                f"  V={V}: formula fused-linear {fused_cpu_formula(1024, V, 256):.1f} MiB, "
                f"matmul+kernel (logits) {logits_cpu_formula(1024, V, 256):.1f} MiB (N*T=1024, H=256, fp32)"
            )
        h = hash_calibration()
        print(
            f"  {h['size_mib']} MiB file: sha256 {h['sha256_s']:.2f} s ({h['sha256_gbps']:.2f} GB/s), "
            f"fingerprint {h['fingerprint_s'] * 1e3:.1f} ms"
        )


if __name__ == "__main__":
    main()
