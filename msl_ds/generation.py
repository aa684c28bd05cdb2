"""Generation under ZeRO-3, coordinated by rank 0 (DESIGN.md §3).

Rank 0 fixes the job list and broadcasts it. The jobs are cut into batches *globally* (sorted by
prompt length, then index) and the batches are dealt to ranks round-robin, so a batch's contents,
and with them its sampling seed and padding, do not depend on the world size: 1 rank and 8 ranks
generate the same text, sampled or greedy. When the full weights fit (a memory estimate against ``eval.gather_max_gib``), each rank gathers them once into
a hook-free copy and generates its shard independently with batching and a KV cache; otherwise every rank steps
through ``generate(synced_gpus=True)`` together, gathering parameters layer by layer per token.
The results are gathered back in job order, so the output does not depend on the world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from msl_ds import distributed as D
from msl_ds.modeling import prompt_ids
from msl_ds.monitor import progress


@dataclass
class GenConfig:
    max_new_tokens: int = 16
    batch_size: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    mode: str = "auto"  # auto | gathered | synced
    gather_max_gib: float = 8.0
    seed: int = 0

    @classmethod
    def from_eval(cls, e, seed: int) -> "GenConfig":
        """From the run config's ``eval`` section."""
        return cls(
            e.max_new_tokens, e.batch_size, e.do_sample, e.temperature, e.top_p, e.generation, e.gather_max_gib, seed
        )


def full_param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the full (unpartitioned) weights."""
    total = 0
    for p in model.parameters():
        numel = getattr(p, "ds_numel", p.numel())
        total += numel * p.element_size()
    return total


def choose_mode(model: torch.nn.Module, cfg: GenConfig) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    partitioned = any(D.is_partitioned(p) for p in model.parameters())
    if not partitioned:
        return "local"
    return "gathered" if full_param_bytes(model) <= cfg.gather_max_gib * 2**30 else "synced"


@torch.no_grad()
def _generate_batch(model, batch: list[list[int]], pad_id: int, eos_id: int, cfg: GenConfig, synced: bool, seed: int):
    dev = next(model.parameters()).device
    T = max(len(x) for x in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long, device=dev)
    attn = torch.zeros_like(ids)
    for i, x in enumerate(batch):  # left padding so every row continues at the same position
        ids[i, T - len(x) :] = torch.tensor(x, device=dev)
        attn[i, T - len(x) :] = 1
    kwargs: dict[str, Any] = dict(
        max_new_tokens=cfg.max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id, use_cache=True
    )
    if synced:
        kwargs["synced_gpus"] = True
    if not cfg.do_sample:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return model.generate(input_ids=ids, attention_mask=attn, **kwargs)[:, T:].tolist()
    kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p)
    # sampling draws from the global generator: fork it, so that generating leaves the training
    # RNG stream exactly where it was (a resumed stage that skips generation sees the same stream)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=attn, **kwargs)
    return out[:, T:].tolist()


def global_batches(jobs: list[tuple[int, list[int]]], batch_size: int) -> list[list[tuple[int, list[int]]]]:
    """The whole job list cut into length-sorted batches, the same for every world size."""
    ordered = sorted(jobs, key=lambda j: (len(j[1]), j[0]))  # similar lengths batch together
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def generate(
    model, tokenizer, pad_id: int | None, questions: list[str], cfg: GenConfig, desc: str = "generate"
) -> list[dict[str, Any]]:
    """Answer every question; returns ``[{"text", "finished"}]`` in question order on every rank.

    A batch is seeded with ``cfg.seed`` plus the index of its first question, so with
    ``do_sample`` the output is a function of (seed, question list) alone.
    """
    questions = D.broadcast_object(questions)  # rank 0's plan is the plan
    pad = pad_id if pad_id is not None else tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    jobs = [(i, prompt_ids(tokenizer, q)) for i, q in enumerate(questions)]
    w, r = D.world_size(), D.rank()
    batches = global_batches(jobs, cfg.batch_size)[r::w]  # round-robin: every rank gets short and long ones
    mode = choose_mode(model, cfg)
    if mode == "synced":  # every rank must call generate the same number of times
        n = max(D.all_gather_objects(len(batches)))
        batches += [[]] * (n - len(batches))
    was_training = model.training
    model.eval()
    gen_model = D.unpartitioned_copy(model) if mode == "gathered" else model
    results: list[tuple[int, list[int]]] = []
    for batch in progress(batches, desc=desc):
        if not batch:  # a synced rank with nothing left still steps with a dummy prompt
            _generate_batch(gen_model, [jobs[0][1]], pad, eos, cfg, True, cfg.seed)
            continue
        seed = cfg.seed + min(j[0] for j in batch)
        outs = _generate_batch(gen_model, [j[1] for j in batch], pad, eos, cfg, mode == "synced", seed)
        results += [(j[0], o) for j, o in zip(batch, outs)]
    del gen_model
    model.train(was_training)
    merged = sorted(D.gather_shards(results))
    return [_decode(tokenizer, toks, eos, pad) for _, toks in merged]


def _decode(tokenizer, toks: list[int], eos: int, pad: int) -> dict[str, Any]:
    finished = eos in toks
    if finished:
        toks = toks[: toks.index(eos)]
    toks = [t for t in toks if t != pad]
    return {"text": tokenizer.decode(toks, skip_special_tokens=True).strip(), "finished": finished}
