"""Scale model: per-rank memory and time per phase of one msl_ds stage at 8B and 70B.

Usage::

    python benchmarks/scale_model.py                       # 8B and 70B on 8, 16, 64 H100-80GB
    python benchmarks/scale_model.py --gpus 8 16 --facts 20000
    python benchmarks/scale_model.py --comm --gpus 16      # communication per forward / per step, hpZ on and off
    python benchmarks/scale_model.py --set train.global_batch_size=512   # any run-config override
    python benchmarks/scale_model.py --calibrate            # also print the CPU calibration (see below)

Everything here is arithmetic over the formulas the code implies (docs/SCALE.md derives each
one and names the source of every assumption); nothing is measured on a GPU. The settings are
read from a run config (``--config``, default ``ds_configs/run_gpu_8b.yaml`` + the DeepSpeed JSON
it names): bf16 weights under ZeRO-3 with fp32 master weights and Adam, gradients accumulated and
reduce-scattered in ``deepspeed.communication_data_type``, ``train.logprobs=fused_linear``,
gradient checkpointing, ``train.global_batch_size`` groups per step, forwards filled up to
``train.max_tokens_per_micro_batch``, HF ``generate`` for the probe, augmentation and evaluation.

The training forwards are not estimated: a synthetic stage of the workload's groups (gold +
candidates, augmentation rows, background rows) is planned by msl_ds's own batcher
(``data.stage_plan`` + ``batching.step_forwards``, what ``trainer.StageTrainer`` runs), and each
step's forwards per rank, padded tokens and filler forwards are counted.

Phases of a stage (launch/train.py ``run_stage``):

* ``train``: forward+backward+step over the stage's groups; compute at an assumed MFU, ZeRO-3's
  parameter all-gathers (forward, recompute, backward) and gradient reduce-scatters per forward
  (with hpZ the gathers after a step's first stay inside a node), overlapped with compute
  (``overlap_comm``): a step takes the larger of the two.
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
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

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
    """Assumptions about the cluster (docs/SCALE.md "Assumptions" gives the source of each)."""

    name: str = "H100-SXM-80GB"
    hbm_gb: float = 80.0
    hbm_tbps: float = 3.35  # HBM bandwidth, TB/s (H100 SXM datasheet)
    peak_tflops: float = 989.0  # dense bf16 (H100 SXM datasheet; msl_ds/telemetry.py uses the same)
    gpus_per_node: int = 8
    intra_gbps: float = 360.0  # assumed NCCL bus bandwidth inside a node (NVLink 4: 450 GB/s per direction)
    inter_gbps: float = 40.0  # assumed across nodes, per GPU (one 400 Gb/s = 50 GB/s NIC per GPU, ~80%)
    disk_gbps_per_node: float = 2.0  # sustained write of a node to the shared checkpoint store, GB/s
    host_ram_gb: float = 1000.0  # per node


@dataclass(frozen=True)
class Workload:
    """One stage of an msl run: the data (assumed sizes) and the run config that trains on it."""

    facts: int = 10_000  # training facts of the stage
    subjects_per_fact: float = 1 / 3  # distinct subjects per fact (backgrounds are per subject)
    candidates: int = 4  # distinct candidates kept per fact (of 1 greedy + pbl.samples)
    row_tokens: int = 64  # padded tokens of a question/answer row (and of each candidate)
    background_tokens: int = 256  # padded tokens of a background or rehearsal row
    prompt_tokens: float = 48.0  # mean prompt of a generate call
    eval_questions: int = 2_000  # test questions per stage set
    stages_seen: int = 8  # stage test sets evaluated at the last stage (0 .. 7)
    retain_general: int = 3_000  # retain + general questions
    mfu_train: float = 0.40  # assumed model-FLOPs utilisation of training (a target, not a measurement)
    mfu_forward: float = 0.50  # reference log-probs (forward only, large batches)
    gen_step_overhead_s: float = 0.025  # assumed HF generate fixed cost per decode step
    gather_max_gib: float = 24.0  # GiB left for a gathered copy (the run measures it: eval.gather_max_gib=auto)
    cfg: Any = None  # the run config (msl_ds.config.RunConfig); load_workload fills it
    hpz: int = 1  # zero_hpz_partition_size of its DeepSpeed JSON
    seed: int = 0  # the plan's permutation seed (stage_plan)

    # the run config's settings the model uses
    @property
    def train(self):
        return self.cfg.train

    @property
    def samples(self) -> int:
        return self.cfg.pbl.samples

    @property
    def paraphrase(self) -> int:
        return self.cfg.augment.paraphrase

    @property
    def expansion(self) -> int:
        return self.cfg.augment.expansion

    @property
    def gen_batch(self) -> int:
        return self.cfg.eval.batch_size

    @property
    def new_tokens_answer(self) -> int:
        return self.cfg.pbl.max_new_tokens

    @property
    def new_tokens_question(self) -> int:
        return self.cfg.augment.max_new_tokens

    @property
    def new_tokens_background(self) -> int:
        return self.cfg.augment.background_max_new_tokens

    @property
    def comm_bytes(self) -> int:
        """Bytes per gradient element reduce-scattered (deepspeed.communication_data_type in a bf16 run)."""
        return 4 if self.cfg.deepspeed.communication_data_type == "fp32" or self.cfg.model.dtype == "fp32" else 2


def load_workload(config: str = "run_gpu_8b.yaml", overrides: list[str] | None = None, **kw) -> Workload:
    """The workload trained under a run config (+ ``key=value`` overrides) and its DeepSpeed JSON."""
    from msl_ds.config import load_config, load_deepspeed_config

    cfg = load_config(config, overrides or [])
    ds = load_deepspeed_config(cfg, cfg.train.global_batch_size or 1)
    hpz = int(ds.get("zero_optimization", {}).get("zero_hpz_partition_size", 1))
    return dataclasses.replace(Workload(), cfg=cfg, hpz=hpz, **kw)


def stage_groups(w: Workload) -> list:
    """The stage's training groups as msl_ds builds them (``recipe.run_stage``): per fact, the gold
    row with its kept candidates (one group), its paraphrases and expansions (a row each); per
    subject a background-integrated question and a rehearsal text (a row each); fixed lengths."""
    from msl_ds.data import Example

    def row(n: int) -> Example:
        return Example(list(range(n)), list(range(n)), {})

    qa = Example(
        list(range(w.row_tokens)), list(range(w.row_tokens)), {}, candidates=[row(w.row_tokens)] * w.candidates
    )
    short, long = row(w.row_tokens), row(w.background_tokens)
    subjects = round(w.facts * w.subjects_per_fact)
    return [qa] * w.facts + [short] * (w.facts * (w.paraphrase + w.expansion)) + [long] * (2 * subjects)


@dataclass
class TrainPlan:
    """What msl_ds's batcher makes of a stage on ``gpus`` ranks (counted, not estimated)."""

    steps: int = 0
    forwards: int = 0  # per rank (every rank runs as many)
    fillers: int = 0  # filler forwards, all ranks together
    tokens: int = 0  # padded tokens processed, all ranks (filler forwards included)
    step_forwards: list[int] = field(default_factory=list)  # forwards per rank of each step
    step_tokens: list[int] = field(default_factory=list)  # the busiest rank's padded tokens of each step

    def tokens_per_forward(self, gpus: int) -> float:
        """Mean padded tokens of a forward (filler forwards included)."""
        return self.tokens / max(1, self.forwards * gpus)


def train_plan(w: Workload, gpus: int) -> TrainPlan:
    """Plan the stage with msl_ds's own code: ``data.stage_plan`` then ``batching.step_forwards``
    per step, as ``trainer.StageTrainer`` does on every rank."""
    from msl_ds.batching import padded_tokens, step_forwards
    from msl_ds.config import batch_shape
    from msl_ds.data import stage_plan

    ex = stage_groups(w)
    shape = batch_shape(w.train, gpus)
    packed = w.train.packing
    plan = TrainPlan()
    size = {}  # padded tokens of a group, by identity (the groups of a kind are one object)

    def tok(i: int) -> int:
        k = id(ex[i])
        if k not in size:
            size[k] = padded_tokens([ex[i]], packed)
        return size[k]

    cache: dict[tuple, tuple] = {}  # steps whose groups have the same sizes plan alike
    for batch in stage_plan(ex, w.train, gpus, w.seed):
        key = tuple(sorted(id(ex[i]) for i in batch))
        if key not in cache:
            fw = step_forwards(batch, shape, gpus, ex, packed)
            per_rank = []
            fills = 0
            for forwards in fw:
                mine = [i for f in forwards if f is not None for i in f]
                smallest = min(tok(i) for i in mine)
                fills += sum(f is None for f in forwards)
                per_rank.append(
                    sum(padded_tokens([ex[i] for i in f], packed) if f is not None else smallest for f in forwards)
                )
            cache[key] = (len(fw[0]), fills, sum(per_rank), max(per_rank))
        n, fills, total, busiest = cache[key]
        plan.steps += 1
        plan.forwards += n
        plan.fillers += fills
        plan.tokens += total
        plan.step_forwards.append(n)
        plan.step_tokens.append(busiest)
    return plan


def _allgather_bw(hw: Hardware, gpus: int) -> float:
    return (hw.intra_gbps if gpus <= hw.gpus_per_node else hw.inter_gbps) * GB


def comm_seconds(m: Model, hw: Hardware, w: Workload, gpus: int, forwards: int, hpz: int | None = None) -> float:
    """ZeRO-3 communication of one optimizer step of ``forwards`` forwards, per rank, in seconds.

    Each forward all-gathers the bf16 parameters three times (forward, the checkpointed recompute,
    backward: 3 x 2N bytes) and reduce-scatters the gradients once (N x ``comm_bytes``); a
    collective over R ranks moves (R-1)/R of its bytes through each rank's link. With hpZ
    (``zero_hpz_partition_size`` = P > 1) the step's first gather reads the primary (global)
    partition and every later gather the secondary copy inside a group of P ranks (DeepSpeed
    invalidates the secondary copies in ``step()``); the reduce-scatter stays global.
    """
    N = m.params
    hpz = w.hpz if hpz is None else hpz
    bw = _allgather_bw(hw, gpus)
    share = (gpus - 1) / gpus
    reduce = forwards * N * w.comm_bytes * share / bw
    gathers = 3 * forwards
    if hpz <= 1 or gpus <= hpz:
        return gathers * 2 * N * share / bw + reduce
    local = (hpz - 1) / hpz / _allgather_bw(hw, hpz)
    return 2 * N * share / bw + (gathers - 1) * 2 * N * local + reduce


def train_times(m: Model, hw: Hardware, w: Workload, gpus: int, plan: TrainPlan | None = None) -> dict[str, float]:
    """Seconds of the train phase: per step max(compute of the busiest rank, communication)."""
    plan = plan or train_plan(w, gpus)
    N = m.params
    flops_tok = (6 * N + 12 * m.layers * m.hidden * w.row_tokens) * (8 / 6)  # + the recomputed forward
    rate = hw.peak_tflops * 1e12 * w.mfu_train
    compute = sum(plan.step_tokens) * flops_tok / rate
    comm = sum(comm_seconds(m, hw, w, gpus, n) for n in plan.step_forwards)
    comm_flat = sum(comm_seconds(m, hw, w, gpus, n, hpz=1) for n in plan.step_forwards)
    step = sum(
        max(t * flops_tok / rate, comm_seconds(m, hw, w, gpus, n)) for t, n in zip(plan.step_tokens, plan.step_forwards)
    )
    return {"train": step, "train_compute": compute, "train_comm": comm, "train_comm_no_hpz": comm_flat}


def memory(m: Model, hw: Hardware, w: Workload, gpus: int) -> dict[str, float]:
    """Per-rank GPU memory in GB by component, for training and for generation."""
    N = m.params
    states = 18 * N / gpus  # bf16 params (2) + fp32 grad partition (4) + fp32 master (4) + Adam m, v (8)
    live = 2 * (2 * m.layer_params) + 2 * m.vocab * m.hidden  # two layers in flight + the gathered lm-head
    buckets = 2 * 2 * 2e8  # reduce bucket + prefetch bucket (2e8 elements, bf16)
    T = forward_cap(w)
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


def forward_cap(w: Workload) -> int:
    """The most padded tokens a training forward holds: the token budget (a single group above it
    aside), else ``micro_batch_size`` of the largest groups."""
    if w.train.max_tokens_per_micro_batch > 0:
        return w.train.max_tokens_per_micro_batch
    return w.train.micro_batch_size * max(w.row_tokens * (1 + w.candidates), w.background_tokens)


def phase_times(m: Model, hw: Hardware, w: Workload, gpus: int, plan: TrainPlan | None = None) -> dict[str, float]:
    """Seconds per phase of one stage."""
    N = m.params
    plan = plan or train_plan(w, gpus)
    times = train_times(m, hw, w, gpus, plan)
    bw = _allgather_bw(hw, gpus)
    F, S = w.facts, w.facts * w.subjects_per_fact
    probe_gen = _decode_time(m, hw, w, gpus, F * (1 + w.samples), w.new_tokens_answer)
    probe_gen += _decode_time(m, hw, w, gpus, S, w.cfg.pbl.subject_max_new_tokens)
    ref_rows = F * (1 + w.candidates)  # reference log-probs: pbl.batch_size rows per forward per rank
    probe_fwd = ref_rows * w.row_tokens * 2 * N / (gpus * hw.peak_tflops * 1e12 * w.mfu_forward)
    probe_fwd += math.ceil(ref_rows / gpus / w.cfg.pbl.batch_size) * 2 * N * (gpus - 1) / gpus / bw
    aug = _decode_time(m, hw, w, gpus, F * (w.paraphrase + w.expansion), w.new_tokens_question)
    aug += _decode_time(m, hw, w, gpus, S, w.new_tokens_background)
    questions = w.eval_questions * (1 + w.stages_seen) + w.retain_general
    evaluation = _decode_time(m, hw, w, gpus, questions, w.cfg.eval.max_new_tokens)
    export = 2 * N / bw + 2 * N / (hw.disk_gbps_per_node * GB)  # gather to rank 0, one node writes
    nodes = max(1, gpus // hw.gpus_per_node)
    every = w.train.save_every_steps
    n_ckpt = 1 + (plan.steps // every if every else 0)
    checkpoint = n_ckpt * 14 * N / (nodes * hw.disk_gbps_per_node * GB)
    return {
        **times,
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
        out.append(f"training comm-bound ({t['train_comm'] / t['train_compute']:.1f}x compute)")
    if mem["host_export_rank0"] > 0.8 * hw.host_ram_gb:
        out.append(f"export: rank 0 holds {mem['host_export_rank0']:.0f} GB in host RAM")
    return out


def comm_share(t: dict[str, float], key: str = "train_comm") -> float:
    """Communication as a share of compute + communication (what it would be without overlap)."""
    return t[key] / (t[key] + t["train_compute"])


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


def train_table(models, gpus_list, hw: Hardware, w: Workload) -> str:
    """The train phase as the batcher plans it: steps, forwards, communication with and without hpZ."""
    lines = [
        "| model | GPUs | groups/step | steps | forwards/rank | tokens/forward | fillers | compute s | "
        "comm s (hpZ off) | comm share | comm s (hpZ " + str(w.hpz if w.hpz > 1 else 8) + ") | comm share | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    hpz = w if w.hpz > 1 else dataclasses.replace(w, hpz=8)
    for m in models:
        for g in gpus_list:
            plan = train_plan(w, g)
            off = train_times(m, hw, dataclasses.replace(w, hpz=1), g, plan)
            on = train_times(m, hw, hpz, g, plan)
            lines.append(
                f"| {m.name} | {g} | {plan_groups(w, g)} | {plan.steps:,} | {plan.forwards:,} | "
                f"{plan.tokens_per_forward(g):,.0f} | {plan.fillers:,} | {off['train_compute']:,.0f} | "
                f"{off['train_comm']:,.0f} | {100 * comm_share(off):.0f}% | {on['train_comm']:,.0f} | "
                f"{100 * comm_share(on):.0f}% | {(on if w.hpz > 1 else off)['train']:,.0f} |"
            )
    return "\n".join(lines)


def comm_table(m: Model, hw: Hardware, w: Workload, gpus: int) -> str:
    """Communication of one forward and one step, hpZ off and on, by collective."""
    N, share = m.params, (gpus - 1) / gpus
    plan = train_plan(w, gpus)
    per_step = plan.forwards / plan.steps
    bw, p = _allgather_bw(hw, gpus), (w.hpz if w.hpz > 1 else 8)
    rows = [
        ("all-gather, forward (bf16)", 2 * N * share / bw, 2 * N * share / bw),
        ("all-gather, recompute (bf16)", 2 * N * share / bw, 2 * N * (p - 1) / p / _allgather_bw(hw, p)),
        ("all-gather, backward (bf16)", 2 * N * share / bw, 2 * N * (p - 1) / p / _allgather_bw(hw, p)),
        (
            f"reduce-scatter, gradients ({w.comm_bytes * 8}-bit)",
            N * w.comm_bytes * share / bw,
            N * w.comm_bytes * share / bw,
        ),
    ]
    lines = [
        f"{m.name} on {gpus} GPUs: {per_step:.2f} forwards per rank per step; seconds per rank",
        "| collective | GB per rank (hpZ off) | s, hpZ off | s, hpZ " + str(p) + " (first forward of a step / later) |",
        "|---|---|---|---|",
    ]
    for name, off, on in rows:
        first = off if name.startswith("all-gather, forward") else on
        later = 2 * N * (p - 1) / p / _allgather_bw(hw, p) if name.startswith("all-gather") else on
        gb = (N * w.comm_bytes if "reduce" in name else 2 * N) * share / GB
        lines.append(f"| {name} | {gb:.1f} | {off:.3f} | {first:.3f} / {later:.3f} |")
    f1 = comm_seconds(m, hw, w, gpus, 1, hpz=1)
    lines.append(f"| one forward | | {f1:.3f} | {comm_seconds(m, hw, w, gpus, 1, hpz=p):.3f} (a step's first) |")
    n = round(per_step)
    lines.append(
        f"| one step ({n} forward{'s' if n != 1 else ''}) | | {comm_seconds(m, hw, w, gpus, n, hpz=1):.3f} | "
        f"{comm_seconds(m, hw, w, gpus, n, hpz=p):.3f} |"
    )
    return "\n".join(lines)


def plan_groups(w: Workload, gpus: int) -> int:
    from msl_ds.config import batch_shape

    return batch_shape(w.train, gpus).groups


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
    ap.add_argument("--config", default="run_gpu_8b.yaml", help="run config (a path or a ds_configs/ name)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run-config overrides")
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 64])
    ap.add_argument("--models", nargs="+", default=["8b", "70b"], choices=["8b", "70b"])
    ap.add_argument("--facts", type=int, default=Workload.facts)
    ap.add_argument("--gather-max-gib", type=float, default=Workload.gather_max_gib)
    ap.add_argument("--hbm-gb", type=float, default=Hardware.hbm_gb, help="80 (H100) or 141 (H200)")
    ap.add_argument("--comm", action="store_true", help="also the communication of one forward / one step")
    ap.add_argument(
        "--calibrate", action="store_true", help="also run the CPU calibration (writes a 512 MiB temp file)"
    )
    a = ap.parse_args()
    logging.disable(logging.INFO)
    models = [{"8b": LLAMA3_8B, "70b": LLAMA3_70B}[k] for k in a.models]
    w = load_workload(a.config, a.set, facts=a.facts, gather_max_gib=a.gather_max_gib)
    hw = dataclasses.replace(Hardware(), hbm_gb=a.hbm_gb)
    for m in models:
        print(f"{m.name}: {m.params / 1e9:.2f}B parameters")
    ex = stage_groups(w)
    t = w.train
    print(
        f"workload: {w.facts} facts/stage -> {len(ex):,} groups per epoch x {t.epochs} epochs; "
        f"train.global_batch_size={t.global_batch_size}, max_tokens_per_micro_batch={t.max_tokens_per_micro_batch}, "
        f"gradients reduced in {w.comm_bytes * 8}-bit, zero_hpz_partition_size={w.hpz}\n"
    )
    print("Per-rank memory (GB):\n")
    print(memory_table(models, a.gpus, hw, w))
    print("\nThe train phase as msl_ds's batcher plans it (seconds per stage):\n")
    print(train_table(models, a.gpus, hw, w))
    print("\nTime per phase of one stage (hours) and where it breaks:\n")
    print(table(models, a.gpus, hw, w))
    if a.comm:
        for m in models:
            for g in a.gpus:
                print("\n" + comm_table(m, hw, w, g))
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
