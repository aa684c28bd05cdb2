"""Generation under ZeRO-3, coordinated by rank 0 (docs/METHOD.md).

Rank 0 fixes the job list and broadcasts it. The jobs are cut into batches *globally* (sorted by
prompt length, then index) and the batches are dealt to ranks round-robin, so a batch's contents,
and with them its sampling seed and padding, do not depend on the world size: 1 rank and 8 ranks
generate the same text, sampled or greedy. When the full weights fit (see :func:`choose_mode`), each rank gathers
them once into a hook-free copy and generates its shard independently with batching and a KV cache; otherwise every
rank steps through ``generate(synced_gpus=True)`` together, gathering parameters layer by layer per token, in batches
of ``eval.synced_batch_size`` prompts (one gather per layer and token serves the whole batch).
The results are gathered back in job order, so the output does not depend on the world size.

Every call records its phase's generated tokens and wall time (:func:`take_gen_rates`): generation
tokens/s per phase, logged on rank 0 and reported in the stage's metrics and TensorBoard.
"""

from __future__ import annotations

import logging
import os
import re
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from msl_ds import distributed as D
from msl_ds.chat import end_of_turn_id, prompt_ids
from msl_ds.io import read_json, write_json
from msl_ds.monitor import progress

log = logging.getLogger(__name__)


@dataclass
class GenConfig:
    max_new_tokens: int = 16
    batch_size: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    mode: str = "auto"  # auto | gathered | synced
    gather_max_gib: float | str = "auto"  # a number (GiB), or "auto": free memory measured at run time
    gather_headroom_gib: float = 4.0  # auto: kept free for the KV cache, activations and allocator slack
    synced_batch_size: int = 0  # prompts per batch in synced mode (0: batch_size)
    seed: int = 0
    top_k: int = 0  # 0: no top-k cut when sampling
    max_unfinished: float = 0.2  # warn when a larger share of a call's generations hits max_new_tokens
    cap_key: str = "eval.max_new_tokens"  # the config key that sets max_new_tokens here: the warnings name it

    @classmethod
    def from_eval(cls, e, seed: int) -> "GenConfig":
        """From the run config's ``eval`` section."""
        return cls(
            max_new_tokens=e.max_new_tokens,
            batch_size=e.batch_size,
            do_sample=e.do_sample,
            temperature=e.temperature,
            top_p=e.top_p,
            mode=e.generation,
            gather_max_gib=e.gather_max_gib,
            gather_headroom_gib=e.gather_headroom_gib,
            synced_batch_size=e.synced_batch_size,
            seed=seed,
            top_k=e.top_k,
            max_unfinished=e.max_unfinished,
        )


def stop_ids(model, tokenizer) -> list[int]:
    """Every token that ends an answer: the checkpoint's ``generation_config.eos_token_id`` (an int
    or a list), the chat template's end-of-turn token and the tokenizer's eos."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    out: list[int] = []
    for i in [*eos, end_of_turn_id(tokenizer), tokenizer.eos_token_id]:
        if i is not None and int(i) not in out:
            out.append(int(i))
    return out


def hf_generation_config(cfg: GenConfig, stops: list[int], pad_id: int):
    """The one ``transformers.GenerationConfig`` of a call, every setting explicit.

    Sampling settings come from ``cfg`` alone (``top_k`` 0 = off, not the library's 50); every other
    logits processor is switched off, so nothing of a checkpoint's ``generation_config`` (a
    repetition penalty, its own temperature) or of the library's defaults changes what is sampled.
    """
    from transformers import GenerationConfig

    sampling: dict[str, Any] = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if cfg.do_sample:
        sampling = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    return GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=0,
        num_beams=1,
        num_return_sequences=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        typical_p=1.0,
        min_p=None,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        eos_token_id=stops,
        pad_token_id=pad_id,
        use_cache=True,
        **sampling,
    )


def full_param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the full (unpartitioned) weights."""
    total = 0
    for p in model.parameters():
        numel = getattr(p, "ds_numel", p.numel())
        total += numel * p.element_size()
    return total


GIB = float(1 << 30)
MEMINFO = "/proc/meminfo"  # where a CPU rank reads MemAvailable


def mem_available_bytes(path: str | os.PathLike | None = None) -> int:
    """The kernel's estimate of memory available to new allocations (``MemAvailable``), in bytes."""
    path = MEMINFO if path is None else path
    with open(path, encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{path}: no MemAvailable line")


def free_memory_bytes(device: torch.device) -> int:
    """What this rank could still allocate: on CUDA the device's free memory plus what PyTorch's
    allocator holds unused; on a CPU the node's ``MemAvailable`` divided by its ranks
    (``LOCAL_WORLD_SIZE``: each of them would hold a full copy)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return mem_available_bytes() // local


def gather_budget(cfg: GenConfig, device: torch.device) -> tuple[float, str]:
    """GiB the gathered copy may take, the same on every rank, and how it was found.

    A number is taken as written. ``auto`` measures every rank's free memory (after the engine
    is built: partitions, optimizer state and buffers are already allocated) and rank 0 decides
    from the smallest, minus ``eval.gather_headroom_gib``; the decision is broadcast, so every rank
    picks the same mode even where their measurements differ (collective: all ranks call it).
    """
    if cfg.gather_max_gib != "auto":
        return float(cfg.gather_max_gib), f"eval.gather_max_gib={cfg.gather_max_gib}"
    free = D.all_gather_objects(free_memory_bytes(device) / GIB)

    def decide() -> tuple[float, str]:
        low = min(free)
        budget = max(0.0, low - cfg.gather_headroom_gib)
        why = (
            f"eval.gather_max_gib=auto: {budget:.2f} GiB = smallest free memory over {len(free)} rank(s) "
            f"{low:.2f} GiB - eval.gather_headroom_gib {cfg.gather_headroom_gib:g}"
        )
        return budget, why

    return D.rank0_decides(decide)


def decide_mode(need_bytes: int, budget_gib: float) -> str:
    """``gathered`` when a full copy of ``need_bytes`` fits ``budget_gib``, else ``synced``."""
    return "gathered" if need_bytes <= budget_gib * GIB else "synced"


def choose_mode(model: torch.nn.Module, cfg: GenConfig) -> str:
    """The generation mode of a call: ``cfg.mode`` when set; ``local`` for an unpartitioned model;
    else gathered or synced by :func:`decide_mode` against :func:`gather_budget`.

    With ``auto`` the budget is measured once per engine (until :func:`release_generation_copy`):
    a copy built by an earlier phase must not count against the next one.
    """
    if cfg.mode != "auto":
        return cfg.mode
    partitioned = any(D.is_partitioned(p) for p in model.parameters())
    if not partitioned:
        return "local"
    key = (cfg.gather_max_gib, cfg.gather_headroom_gib)
    known = _Copy.budget if _Copy.budget_owner is not None and _Copy.budget_owner() is model else None
    if known is None or known[0] != key:
        budget, why = gather_budget(cfg, next(model.parameters()).device)
        known = (key, budget, why)
        _Copy.budget_owner, _Copy.budget = weakref.ref(model), known
        need = full_param_bytes(model)
        if D.is_rank0():
            log.info(
                "generation: %s (full weights %.2f GiB, budget %.2f GiB: %s)",
                decide_mode(need, budget), need / GIB, budget, why,
            )  # fmt: skip
    return decide_mode(full_param_bytes(model), known[1])


@torch.no_grad()
def _generate_batch(model, batch: list[list[int]], pad_id: int, gen_config, synced: bool, seed: int):
    dev = next(model.parameters()).device
    T = max(len(x) for x in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long, device=dev)
    attn = torch.zeros_like(ids)
    for i, x in enumerate(batch):  # left padding so every row continues at the same position
        ids[i, T - len(x) :] = torch.tensor(x, device=dev)
        attn[i, T - len(x) :] = 1
    kwargs: dict[str, Any] = dict(input_ids=ids, attention_mask=attn, generation_config=gen_config)
    if synced:
        kwargs["synced_gpus"] = True
    # the model's own generation_config is set aside for the call: transformers fills every setting
    # left unset from it, and only the explicit config may decide how msl_ds generates
    own, model.generation_config = model.generation_config, gen_config
    try:
        if not gen_config.do_sample:
            return model.generate(**kwargs)[:, T:].tolist()
        # sampling draws from the global generator: fork it, so that generating leaves the training
        # RNG stream exactly where it was (a resumed stage that skips generation sees the same stream)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(**kwargs)
        return out[:, T:].tolist()
    finally:
        model.generation_config = own


def global_batches(jobs: list[tuple[int, list[int]]], batch_size: int) -> list[list[tuple[int, list[int]]]]:
    """The whole job list cut into length-sorted batches, the same for every world size."""
    ordered = sorted(jobs, key=lambda j: (len(j[1]), j[0]))  # similar lengths batch together
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


# --------------------------------------------------------------------------- the generation copy


class _Copy:
    """The gathered copy of one engine's module, kept for every generation phase of a stage.

    :func:`release_generation_copy` frees it (before training, after the last phase). As a guard,
    a copy whose source weights changed since it was built (a checksum of every rank's partitions)
    is rebuilt rather than used.
    """

    owner: "weakref.ref[torch.nn.Module] | None" = None
    checksum: tuple[float, float] | None = None
    model: torch.nn.Module | None = None
    budget_owner: "weakref.ref[torch.nn.Module] | None" = None  # the module the measured budget is for
    budget: tuple[Any, float, str] | None = None  # ((gather_max_gib, headroom), GiB, why)
    built = 0  # copies built in this process (tests count them)


def _checksum(module: torch.nn.Module) -> tuple[float, float]:
    total = torch.zeros(2, dtype=torch.float64)
    for p in module.parameters():
        t = (p.ds_tensor if D.is_partitioned(p) else p).detach()
        total += torch.stack([t.double().sum(), t.double().abs().sum()]).cpu()
    return float(total[0]), float(total[1])


def generation_copy(module: torch.nn.Module) -> torch.nn.Module:
    """The hook-free full copy of ``module`` (all ranks together), built once and then reused."""
    checksum = _checksum(module)
    same = _Copy.owner is not None and _Copy.owner() is module and _Copy.checksum == checksum
    if not all(D.all_gather_objects(same)):  # every rank rebuilds, or none: gathering is collective
        release_generation_copy()
        _Copy.model = D.unpartitioned_copy(module)
        _Copy.owner, _Copy.checksum = weakref.ref(module), checksum
        _Copy.built += 1
    return _Copy.model


def release_generation_copy() -> None:
    """Free the generation copy (call before training: the weights are about to change)."""
    _Copy.owner = _Copy.checksum = _Copy.model = None
    _Copy.budget_owner = _Copy.budget = None  # the next phase measures again (the weights' memory came back)


# --------------------------------------------------------------------------- unfinished generations

_UNFINISHED: dict[str, list[int]] = {}  # phase -> [unfinished, generated] since the last take
_TRACK: dict[str, Path] = {}  # "path": where rank 0 keeps the stage's counts (a resumed stage reads them)


def phase_key(desc: str) -> str:
    """``"stage 3 pre-eval"`` -> ``"pre_eval"``: a phase name without its stage."""
    return re.sub(r"\W+", "_", re.sub(r"^stage \d+ ", "", desc).lower()).strip("_")


def track_unfinished(path: str | Path) -> None:
    """Count this stage's unfinished generations from here on, kept in ``path`` as they come.

    A phase counts once (its last run), so a resumed stage that reads a phase's output instead of
    generating it again reports the same shares as an uninterrupted one.
    """
    _UNFINISHED.clear()
    _RATES.clear()
    _TRACK["path"] = Path(path)
    if Path(path).is_file():
        _UNFINISHED.update(read_json(path))
    if Path(path).with_name(RATES_FILE).is_file():  # generation tokens/s, kept the same way
        _RATES.update(read_json(Path(path).with_name(RATES_FILE)))


def take_unfinished() -> dict[str, float]:
    """``{"unfinished_<phase>": share}`` of every phase since the last call (then forgotten), plus
    ``unfinished``: the share over all of them. The same on every rank."""
    out = {f"unfinished_{k}": u / n for k, (u, n) in sorted(_UNFINISHED.items()) if n}
    total = [sum(v[i] for v in _UNFINISHED.values()) for i in (0, 1)]
    if total[1]:
        out["unfinished"] = total[0] / total[1]
    _UNFINISHED.clear()
    _TRACK.clear()
    return out


def _count_unfinished(desc: str, outputs: list[dict[str, Any]], cfg: GenConfig) -> None:
    if not outputs:
        return
    unfinished = sum(not o["finished"] for o in outputs)
    _UNFINISHED[phase_key(desc)] = [unfinished, len(outputs)]
    if "path" in _TRACK and D.is_rank0():
        write_json(_TRACK["path"], _UNFINISHED)
    share = unfinished / len(outputs)
    if share > cfg.max_unfinished and D.is_rank0():
        log.warning(
            "%s: %d of %d generations (%.0f%%) hit %s=%d without an end token, more than "
            "eval.max_unfinished=%.2f: raise %s if the answers are cut short; otherwise the model may not end "
            "its turns with the tokens msl_ds stops on (check model.chat_template and the checkpoint's "
            "generation_config.eos_token_id)",
            desc, unfinished, len(outputs), 100 * share, cfg.cap_key, cfg.max_new_tokens, cfg.max_unfinished,
            cfg.cap_key,
        )  # fmt: skip


# --------------------------------------------------------------------------- generation tokens/s

_RATES: dict[str, list[float]] = {}  # call (phase_key) -> [generated tokens, seconds] since the last take
RATES_FILE = "gen_rates.json"  # next to the tracked unfinished counts: a resumed stage reads them
RATE_PHASES = ("probe", "augment")  # calls starting with these add up to one phase; the others are their own


def rate_phase(key: str) -> str:
    """The phase a call counts toward: ``probe_samples`` -> ``probe``, ``pre_eval`` -> ``pre_eval``."""
    return next((p for p in RATE_PHASES if key == p or key.startswith(p + "_")), key)


def _count_rate(desc: str, outputs: list[dict[str, Any]], seconds: float, mode: str) -> None:
    """Record (and log on rank 0) one call's generated tokens and wall time.

    Tokens are what the model produced for every prompt, through its end token (all ranks'); the
    time is rank 0's, from the plan to the gathered results. A call counts once (its last run),
    like the unfinished shares, so a resumed stage reports the phases it did not redo as they were.
    """
    if not outputs:
        return
    tokens = sum(len(o["ids"]) for o in outputs)
    _RATES[phase_key(desc)] = [float(tokens), float(seconds)]
    if "path" in _TRACK and D.is_rank0():
        write_json(_TRACK["path"].with_name(RATES_FILE), _RATES)
    if D.is_rank0():
        log.info(
            "%s: %d prompts, %d tokens in %.1f s: %.1f generated tokens/s (%s, %d rank(s))",
            desc, len(outputs), tokens, seconds, tokens / max(seconds, 1e-9), mode, D.world_size(),
        )  # fmt: skip


def take_gen_rates() -> dict[str, float]:
    """``{"gen_tokens_per_s_<phase>": tokens/s}`` since the last call (then forgotten): the tokens
    over the seconds of every call of a phase (:func:`rate_phase`: probe, augment, pre_eval, eval).
    The same on every rank."""
    sums: dict[str, list[float]] = {}
    for key, (tokens, seconds) in _RATES.items():
        acc = sums.setdefault(rate_phase(key), [0.0, 0.0])
        acc[0] += tokens
        acc[1] += seconds
    _RATES.clear()
    return {f"gen_tokens_per_s_{k}": n / s for k, (n, s) in sorted(sums.items()) if s > 0}


def gen_rate_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Stage metrics' ``gen_tokens_per_s_<phase>`` as TensorBoard scalars ``perf/gen_tokens_per_s/<phase>``."""
    prefix = "gen_tokens_per_s_"
    return {f"perf/gen_tokens_per_s/{k[len(prefix) :]}": v for k, v in metrics.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- generate


def generate(
    model, tokenizer, pad_id: int | None, questions: list[str], cfg: GenConfig, desc: str = "generate"
) -> list[dict[str, Any]]:
    """Answer every question; returns ``[{"text", "finished", "ids"}]`` in question order on every rank.

    A batch is seeded with ``cfg.seed`` plus the index of its first question, so with
    ``do_sample`` the output is a function of (seed, question list) alone. An answer is finished
    when it ends with any of :func:`stop_ids`; the share that is not is counted per phase
    (``desc``, see :func:`take_unfinished`) and warned about above ``cfg.max_unfinished``.
    """
    questions = D.broadcast_object(questions)  # rank 0's plan is the plan
    pad = pad_id if pad_id is not None else tokenizer.pad_token_id
    stops = stop_ids(model, tokenizer)
    gen_config = hf_generation_config(cfg, stops, pad)
    jobs = [(i, prompt_ids(tokenizer, q)) for i, q in enumerate(questions)]
    w, r = D.world_size(), D.rank()
    t0 = time.perf_counter()
    mode = choose_mode(model, cfg)
    size = cfg.synced_batch_size if mode == "synced" and cfg.synced_batch_size > 0 else cfg.batch_size
    batches = global_batches(jobs, size)[r::w]  # round-robin: every rank gets short and long ones
    if mode == "synced":  # every rank must call generate the same number of times
        n = max(D.all_gather_objects(len(batches)))
        batches += [[]] * (n - len(batches))
    was_training = model.training
    model.eval()
    gen_model = generation_copy(model) if mode == "gathered" else model
    results: list[tuple[int, list[int]]] = []
    for batch in progress(batches, desc=desc):
        if not batch:  # a synced rank with nothing left still steps with a dummy prompt
            _generate_batch(gen_model, [jobs[0][1]], pad, gen_config, True, cfg.seed)
            continue
        seed = cfg.seed + min(j[0] for j in batch)
        outs = _generate_batch(gen_model, [j[1] for j in batch], pad, gen_config, mode == "synced", seed)
        results += [(j[0], o) for j, o in zip(batch, outs)]
    del gen_model
    model.train(was_training)
    merged = sorted(D.gather_shards(results))
    seconds = D.rank0_decides(lambda: time.perf_counter() - t0)  # rank 0's wall clock: the phase's time
    outputs = [_decode(tokenizer, toks, set(stops), pad) for _, toks in merged]
    _count_unfinished(desc, outputs, cfg)
    _count_rate(desc, outputs, seconds, mode)
    return outputs


def _decode(tokenizer, toks: list[int], stops: set[int], pad: int) -> dict[str, Any]:
    """``text`` up to the first end token, whether there was one, and the generated ``ids`` through it."""
    end = next((k for k, t in enumerate(toks) if t in stops), None)
    finished = end is not None
    ids = toks[: end + 1] if finished else toks
    text = [t for t in (toks[:end] if finished else toks) if t != pad]
    return {"text": tokenizer.decode(text, skip_special_tokens=True).strip(), "finished": finished, "ids": ids}
