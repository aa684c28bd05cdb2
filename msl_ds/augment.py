"""Self-distillation augmentation and dynamic selection (docs/METHOD.md).

Before a stage trains, the current model π_{t-1} rewrites the stage's own data:

* **paraphrase** — "Rephrase the question: x" → x̂, trained as (x̂, y*);
* **expansion** — "Expand the question: x" → x̂ that reasons one step further, trained as (x̂, y*);
* **background** — "Tell me about s." → the model's text b about the fact's subject; trained as
  (b + x, y*), the subject's context integrated into the question;
* **rehearsal** — the same text b trained as the answer to "Tell me about s." (our extension):
  with ``augment.reach: all`` also for subjects of earlier stages that this stage does not
  touch, so that knowledge the stage does not update is rehearsed in the model's own words.

In every text about a subject whose fact changed (rewrites and backgrounds alike), the model's
stale values (its own greedy answers to the fact's questions, and the values they state:
"Paris" out of "The capital of France is Paris.") are replaced by the new gold before anything
is trained on it; a row that still states one is rejected.

**Selection.** The model answers every x̂ (ŷ). A sample's score is MI(x, x̂) · MI(ref, ŷ), where
ref is the gold y* (the paper) or the model's own answer to x (``select.reference: own``), and
MI is the normalised mutual information of word co-occurrence (see :func:`word_mi`). Samples
below ``select.theta`` (or outside the best ``select.top_q`` of their kind) are rejected, as are
empty or truncated outputs, copies and near copies of x, texts that lose the fact's subject,
rewritten questions that state the gold (the model answered instead of rewriting), any row that
still states a stale value (the model's own answer or the value it states, whatever the wording
around it: ``stale``),
rehearsal texts that lose the stage's gold, and rows that do not fit ``data.max_seq_len``. Every generated sample is
kept in the stage's ``augment.jsonl`` with its prompt, raw output, scores and verdict.

All ranks generate together (:func:`msl_ds.generation.generate`: rank 0's job list, the shards
dealt globally so the text does not depend on the world size); the selection is a pure function
of the generated text, which the recipe runs and writes on rank 0.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from typing import Any, Callable

from msl_ds import distributed as D
from msl_ds.answers import extract_value, states
from msl_ds.config import AugmentSection, RunConfig, SelectSection, SkillsSection
from msl_ds.data import DataError, World, encode_example
from msl_ds.evaluation import is_correct
from msl_ds.facts import fact_key
from msl_ds.generation import GenConfig, generate

KINDS = ("paraphrase", "expansion", "background", "rehearsal")
QUESTION_KINDS = ("paraphrase", "expansion", "background")  # x̂ is a question the model answers


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def word_mi(a: str, b: str, vocab: int) -> float:
    """Normalised mutual information of word occurrence in ``a`` and in ``b``, in [0, 1].

    Over a vocabulary of ``vocab`` words (the stage's corpus), draw a word w uniformly; the two
    variables are "w occurs in a" and "w occurs in b". Their mutual information, divided by the
    geometric mean of the two entropies, is 1 for texts with the same words and 0 for texts that
    share none (a negative association counts as none).
    """
    A, B = words(a), words(b)
    if not A or not B:
        return 0.0
    n = max(vocab, len(A | B))
    n11 = len(A & B)
    if n11 * n <= len(A) * len(B):  # independent or negatively associated
        return 0.0
    cells = ((n11, len(A), len(B)), (len(A) - n11, len(A), n - len(B)), (len(B) - n11, n - len(A), len(B)))
    cells += ((n - len(A | B), n - len(A), n - len(B)),)
    mi = sum(c / n * math.log(c * n / (ra * rb)) for c, ra, rb in cells if c)
    ha, hb = _entropy(len(A) / n), _entropy(len(B) / n)
    if ha == 0 or hb == 0:  # a text that uses every word of the vocabulary
        return 1.0 if A == B else 0.0
    return min(1.0, mi / math.sqrt(ha * hb))


def _entropy(p: float) -> float:
    return -sum(q * math.log(q) for q in (p, 1 - p) if q > 0)


def jaccard(a: str, b: str) -> float:
    A, B = words(a), words(b)
    return len(A & B) / len(A | B) if A | B else 1.0


def statements(text: str) -> list[str]:
    """The sentences of a text (split after each full stop)."""
    return [x.strip() for x in re.split(r"(?<=\.)\s+", text.strip()) if x.strip()]


def _key(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def consistent_statements(greedy: str, samples: list[str], agree: float) -> list[str]:
    """The sentences of ``greedy`` that at least a share ``agree`` of ``samples`` state too
    (whole words, case and punctuation ignored): what the model says consistently."""
    said = [f" {_key(x)} " for x in samples]
    kept = []
    for sentence in statements(greedy):
        key = _key(sentence)
        if key and samples and sum(f" {key} " in x for x in said) / len(samples) >= agree:
            kept.append(sentence)
    return kept


def stale_values(own: str, question: str, gold: str) -> list[str]:
    """What the model's own answer ``own`` to ``question`` states when it is not ``gold``: the
    answer itself and the value it states (:func:`msl_ds.answers.extract_value`), whichever do
    not state the gold. Empty when the model already gives the gold or says nothing."""
    if not own.strip() or states(own, gold):
        return []
    out = []
    for v in (own.strip(), extract_value(own, question)):
        if v and not states(v, gold) and not states(gold, v) and v not in out:
            out.append(v)
    return out


def replace_stale(text: str, stale: str, gold: str) -> str:
    """``text`` with every whole-word occurrence of ``stale`` (any case) replaced by ``gold``."""
    if not stale.strip():
        return text
    return re.sub(rf"(?<!\w){re.escape(stale.strip())}(?!\w)", gold, text, flags=re.IGNORECASE)


# --------------------------------------------------------------------------- the phase


def augment_seed(run_seed: int, stage: int) -> int:
    """The augmentation's sampling seed: one stream per (run seed, stage)."""
    return run_seed * 1_000_003 + stage * 10_007 + 1


def fits_in(tokenizer, max_len: int) -> Callable[[dict[str, Any]], bool]:
    """Whether a generated row fits ``max_len`` tokens (the prompt may be cut from the left)."""

    def fits(row: dict[str, Any]) -> bool:
        try:
            encode_example(tokenizer, {**row, "id": "augment"}, max_len, "truncate", "augment")
        except DataError:
            return False
        return True

    return fits


def run_augment(model, tokenizer, pad_id, world: World, stage: int, cfg: RunConfig, gen: GenConfig):
    """The phase for one stage of ``world``: every rank generates; rank 0 selects.

    Returns the records on every rank, selected (``accepted``, ``reason``, scores) on rank 0.
    """
    rows = world.split(stage, "train")
    earlier = world.train_before(stage)
    seed = augment_seed(cfg.run.seed, stage)
    aug = resolve_caps(cfg.augment, tokenizer, rows, cfg.data.max_seq_len)
    records = augment_stage(model, tokenizer, pad_id, rows, earlier, aug, cfg.skills, gen, seed, stage)
    if D.is_rank0():
        corpus = {w for r in rows + earlier for w in words(f"{r['question']} {r['answer']}")}
        select(records, cfg.select, fits_in(tokenizer, cfg.data.max_seq_len), corpus)
    return records


def resolve_caps(aug: AugmentSection, tokenizer, rows: list[dict[str, Any]], max_len: int) -> AugmentSection:
    """``augment.max_new_tokens`` and ``augment.background_max_new_tokens`` when ``auto``, from the
    model's tokenizer and the stage's data.

    A rewritten question may run to 1.5 times the longest training question (in the model's tokens)
    plus 8; a background text gets what ``data.max_seq_len`` leaves after the longest rendered
    question and answer (it is prepended to a question), at least 16 tokens.
    """
    if aug.max_new_tokens != "auto" and aug.background_max_new_tokens != "auto":
        return aug
    from msl_ds.chat import encode_turn

    longest_q = max((len(tokenizer.encode(r["question"], add_special_tokens=False)) for r in rows), default=16)
    longest_row = max((len(encode_turn(tokenizer, r["question"], r["answer"])[0]) for r in rows), default=32)
    caps = {}
    if aug.max_new_tokens == "auto":
        caps["max_new_tokens"] = math.ceil(1.5 * longest_q) + 8
    if aug.background_max_new_tokens == "auto":
        caps["background_max_new_tokens"] = max(16, max_len - longest_row)
    return dataclasses.replace(aug, **caps)


def subject_order(earlier: list[dict[str, Any]]) -> list[str]:
    """Every subject of ``earlier`` (training rows in stage order, as ``World.train_before`` gives
    them) in order of first appearance: a subject's position never changes when later stages
    append rows, which is what keeps the round-robin below a fixed period per subject."""
    return list(dict.fromkeys(r["subject"] for r in earlier if r.get("subject")))


def pseudo_subjects(earlier: list[dict[str, Any]]) -> set[str]:
    """Subjects whose every row is of kind ``general``: the embedded world's arithmetic items
    ("23+45"), not entities with facts."""
    kinds: dict[str, set[str]] = defaultdict(set)
    for r in earlier:
        if r.get("subject"):
            kinds[r["subject"]].add(r.get("kind", ""))
    return {s for s, k in kinds.items() if k == {"general"}}


def scheduled_subjects(rows: list[dict[str, Any]], earlier: list[dict[str, Any]], every: int, stage: int) -> list[str]:
    """Earlier subjects this stage rehearses: round-robin over :func:`subject_order`, the subject
    at position p at the stages t with t ≡ p (mod ``every``); so within any ``every``
    consecutive stages each subject trained before the first of them is rehearsed (or trained
    by the stage itself) at least once, however many subjects there are. This stage's own
    subjects are left out (they are rehearsed as stage subjects)."""
    mine = {r["subject"] for r in rows if r.get("subject")}
    return sorted(s for p, s in enumerate(subject_order(earlier)) if p % every == stage % every and s not in mine)


def coverage(rows: list[dict[str, Any]], earlier: list[dict[str, Any]], rehearsed: set[str]) -> float:
    """Share of the earlier fact subjects (pseudo-subjects excluded) rehearsed or trained now."""
    pool = set(subject_order(earlier)) - pseudo_subjects(earlier)
    now = rehearsed | {r["subject"] for r in rows if r.get("subject")}
    return len(pool & now) / len(pool) if pool else float("nan")


def coverage_metrics(world: World, stage: int, stages: list[int], aug: AugmentSection, records) -> dict[str, float]:
    """Rehearsal coverage of stage ``stage``: the schedule's share of earlier fact subjects
    (``rehearsal_subject_coverage``), the share with an accepted rehearsal
    (``rehearsal_accepted_coverage``), and the schedule's coverage of the subjects trained before
    the window of the last ``augment.rehearsal_every`` run stages (``rehearsal_window_coverage``,
    1.0 by construction once the run has that many stages)."""
    if aug.reach != "all" or not aug.rehearsal:
        return {}
    rows, earlier = world.split(stage, "train"), world.train_before(stage)
    planned = set(scheduled_subjects(rows, earlier, aug.rehearsal_every, stage))
    accepted = {r["subject"] for r in records if r["kind"] == "rehearsal" and r["accepted"]}
    window = [s for s in stages if s <= stage][-aug.rehearsal_every :]
    return {
        "rehearsal_subject_coverage": coverage(rows, earlier, planned),
        "rehearsal_accepted_coverage": coverage(rows, earlier, accepted),
        "rehearsal_window_coverage": window_coverage(world, window, aug.rehearsal_every),
        "rehearsal_subjects": len(planned),
        "rehearsal_pseudo_subjects": len(planned & pseudo_subjects(earlier)),
    }


def window_coverage(world: World, window: list[int], every: int) -> float:
    """Share of the fact subjects trained before ``window[0]`` that the schedule rehearses (or a
    stage trains) at some stage of ``window``."""
    first = world.train_before(window[0])
    pool = set(subject_order(first)) - pseudo_subjects(first)
    seen: set[str] = set()
    for t in window:
        rows = world.split(t, "train")
        seen |= set(scheduled_subjects(rows, world.train_before(t), every, t))
        seen |= {r["subject"] for r in rows if r.get("subject")}
    return len(pool & seen) / len(pool) if pool else float("nan")


def augment_stage(
    model,
    tokenizer,
    pad_id,
    rows: list[dict[str, Any]],
    earlier: list[dict[str, Any]],
    aug: AugmentSection,
    skills: SkillsSection,
    gen: GenConfig,
    seed: int,
    stage: int,
) -> list[dict[str, Any]]:
    """Generate every augmentation of ``rows`` and the model's answers to them (all ranks).

    Returns one record per generated sample (not yet selected), the same on every rank.
    """
    facts: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        facts[fact_key(r)].append(r)
    greedy = dataclasses.replace(gen, do_sample=False, batch_size=aug.batch_size, seed=seed)
    own = generate(model, tokenizer, pad_id, [r["question"] for r in rows], greedy, desc="augment: own answers")
    own_answer = {r["id"]: o["text"] for r, o in zip(rows, own)}

    # stale values: what the model says now for a fact whose gold it does not give yet
    stale: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for phrasings in facts.values() if aug.replace_stale else ():
        for r in phrasings:  # every phrasing's answer: a value said once is a value the model holds
            if r.get("subject"):
                for v in stale_values(own_answer[r["id"]], r["question"], r["answer"]):
                    if (v, r["answer"]) not in stale[r["subject"]]:
                        stale[r["subject"]].append((v, r["answer"]))
    for pairs in stale.values():
        pairs.sort(key=lambda p: -len(p[0]))  # the whole sentence before the value it contains

    # backgrounds: the stage's subjects, plus others the model knows when reach is "all"
    records: list[dict[str, Any]] = []
    stage_subjects = sorted({r["subject"] for r in rows if r.get("subject")})
    subjects = list(stage_subjects)
    if aug.reach == "all":
        subjects += scheduled_subjects(rows, earlier, aug.rehearsal_every, stage)
    pseudo = pseudo_subjects(earlier) - set(stage_subjects)
    background: dict[str, tuple[str, str, dict[str, Any]]] = {}  # subject -> (fixed text, prompt, raw output)
    if subjects and (aug.background or aug.rehearsal):
        prompts = [skills.background_prompt.format(subject=s) for s in subjects]
        cfg = dataclasses.replace(
            greedy, max_new_tokens=aug.background_max_new_tokens, cap_key="augment.background_max_new_tokens"
        )
        outs = generate(model, tokenizer, pad_id, prompts, cfg, desc="augment: backgrounds")
        samples = _rehearsal_samples(model, tokenizer, pad_id, prompts, aug, cfg, seed) if aug.rehearsal else {}
        for i, (s, p, o) in enumerate(zip(subjects, prompts, outs)):
            text = o["text"]
            for old, new in stale.get(s, []):
                text = replace_stale(text, old, new)
            background[s] = (text, p, o)
            if aug.rehearsal:
                golds = sorted({r["answer"] for r in rows if r.get("subject") == s})
                extra: dict[str, Any] = {}
                if samples:  # keep only what the model states consistently
                    said = [_fix(x, stale.get(s, [])) for x in samples[i]]
                    kept = consistent_statements(text, said, aug.rehearsal_agree)
                    extra = {"samples": said, "statements": len(statements(text)), "consistent": len(kept)}
                    text_r = " ".join(kept)
                else:
                    text_r = text
                records.append(
                    _record(
                        "rehearsal", f"subject/{s}", s, p, o, p, text_r, stage_golds=golds, stale=stale.get(s, []),
                        pseudo=s in pseudo, **extra,
                    )
                )  # fmt: skip

    # question rewrites: paraphrases and expansions (sampled), background + question
    jobs: list[tuple[str, dict[str, Any], str]] = []
    for phrasings in facts.values():
        for kind, n, template in (
            ("paraphrase", aug.paraphrase, skills.paraphrase_prompt),
            ("expansion", aug.expansion, skills.expansion_prompt),
        ):
            for k in range(n):
                jobs.append((kind, phrasings[k % len(phrasings)], template))
    sampled = dataclasses.replace(
        greedy,
        max_new_tokens=aug.max_new_tokens,
        cap_key="augment.max_new_tokens",
        do_sample=aug.temperature > 0,
        temperature=aug.temperature or 1.0,
        top_p=aug.top_p,
        seed=seed + 1,
    )
    prompts = [t.format(question=r["question"]) for _, r, t in jobs]
    outs = generate(model, tokenizer, pad_id, prompts, sampled, desc="augment: rewrites")
    for (kind, r, _), p, o in zip(jobs, prompts, outs):
        text = o["text"]
        for old, new in stale.get(r.get("subject") or "", []):
            text = replace_stale(text, old, new)
        records.append(
            _record(
                kind, r["id"], r.get("subject"), p, o, text, r["answer"], x=r["question"],
                stale=stale.get(r.get("subject") or "", []),
            )
        )  # fmt: skip
    if aug.background:
        for phrasings in facts.values():
            r = phrasings[0]
            if r.get("subject") in background:
                text, prompt, o = background[r["subject"]]
                q = f"{text} {r['question']}" if text else ""
                records.append(
                    _record(
                        "background", r["id"], r["subject"], prompt, o, q, r["answer"], x=r["question"],
                        stale=stale.get(r["subject"], []),
                    )
                )  # fmt: skip

    # the model answers every rewritten question: ŷ, for the selection
    asked = [rec for rec in records if rec["kind"] in QUESTION_KINDS and rec["question"]]
    answers = generate(model, tokenizer, pad_id, [rec["question"] for rec in asked], greedy, desc="augment: answers")
    for rec, a in zip(asked, answers):
        rec["y_hat"] = a["text"]
        rec["own"] = own_answer[rec["source_id"]]
    for i, rec in enumerate(records):
        rec["id"] = f"aug/s{stage:02d}/{rec['kind']}/{i:05d}"
    return records


def _fix(text: str, stale: list[tuple[str, str]]) -> str:
    for old, new in stale:
        text = replace_stale(text, old, new)
    return text


def _rehearsal_samples(model, tokenizer, pad_id, prompts: list[str], aug: AugmentSection, cfg: GenConfig, seed: int):
    """``aug.rehearsal_samples`` sampled descriptions per prompt (index -> texts); {} when 0."""
    k = aug.rehearsal_samples
    if not k or not prompts:
        return {}
    sampled = dataclasses.replace(
        cfg, do_sample=True, temperature=aug.rehearsal_temperature, top_p=aug.top_p, seed=seed + 2
    )
    outs = generate(model, tokenizer, pad_id, [p for p in prompts for _ in range(k)], sampled, desc="augment: samples")
    return {i: [o["text"] for o in outs[i * k : (i + 1) * k]] for i in range(len(prompts))}


def _record(kind, source_id, subject, prompt, out, question, answer, **extra) -> dict[str, Any]:
    return {
        "kind": kind,
        "source_id": source_id,
        "subject": subject,
        "prompt": prompt,
        "raw": out["text"],
        "finished": bool(out["finished"]),
        "question": question.strip(),
        "answer": answer.strip(),
        **extra,
    }


# --------------------------------------------------------------------------- selection


def select(
    records: list[dict[str, Any]],
    sel: SelectSection,
    fits: Callable[[dict[str, Any]], bool] | None = None,
    corpus: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Score every record and set ``accepted`` and ``reason`` (``"ok"`` when accepted), in place.

    Format rules always apply; the score rules only when ``sel.enabled``. MI is taken over the
    words of ``corpus`` (the run's training text so far) together with the records' own words.
    """
    corpus = set(corpus or ())
    for rec in records:
        for key in ("x", "question", "answer", "y_hat", "own"):
            corpus |= words(rec.get(key) or "")
    vocab = len(corpus)
    seen: set[tuple[str, str]] = set()
    for rec in records:
        rec["score"] = None
        rec["reason"] = _format_reason(rec, sel, seen)
        if rec["reason"] is None and fits is not None and not fits(rec):
            rec["reason"] = "too_long"
        if rec["kind"] in QUESTION_KINDS:
            ref = rec["answer"] if sel.reference == "gold" else rec.get("own", "")
            rec["mi_x"] = word_mi(rec["x"], rec["question"], vocab)
            rec["mi_y"] = word_mi(ref, rec.get("y_hat", ""), vocab)
            rec["score"] = rec["mi_x"] * rec["mi_y"]
            if rec["reason"] is None and sel.enabled:
                if sel.contains_gold and not is_correct(rec.get("y_hat", ""), rec["answer"]):
                    rec["reason"] = "answer_lacks_gold"
                elif sel.rule == "threshold" and rec["score"] < sel.theta:
                    rec["reason"] = "low_score"
    if sel.enabled and sel.rule == "top_q":
        for kind in QUESTION_KINDS:
            alive = [r for r in records if r["kind"] == kind and r["reason"] is None]
            keep = math.ceil(sel.top_q * len(alive))
            for r in sorted(alive, key=lambda r: -r["score"])[keep:]:
                r["reason"] = "below_top_q"
    for rec in records:
        rec["accepted"] = rec["reason"] is None
        rec["reason"] = rec["reason"] or "ok"
    return records


def _format_reason(rec: dict[str, Any], sel: SelectSection, seen: set[tuple[str, str]]) -> str | None:
    if rec["kind"] == "rehearsal" and rec.get("consistent") == 0 and rec["raw"].strip():
        return "inconsistent"  # the model said something, but nothing of it consistently
    if not rec["raw"].strip() or not rec["question"] or not rec["answer"]:
        return "empty"
    if not rec["finished"]:
        return "truncated"
    if rec["kind"] == "rehearsal":
        if rec["subject"].lower() not in rec["answer"].lower():
            return "off_subject"
        if any(not is_correct(rec["answer"], g) for g in rec.get("stage_golds", [])):
            return "gold_missing"
    elif rec["subject"] and rec["subject"].lower() not in rec["question"].lower():
        return "off_subject"
    elif rec["kind"] != "background":
        if states(rec["question"], rec["answer"]):
            return "states_answer"  # the model answered instead of rewriting: not a question about x
        if words(rec["question"]) == words(rec["x"]):
            return "copy"
        if jaccard(rec["question"], rec["x"]) >= sel.near_copy:
            return "near_copy"
    if any(states(f"{rec['question']} {rec['answer']}", old) for old, _ in rec.get("stale", [])):
        return "stale"  # a value the model gave for a fact that changed, left after the replacement
    key = (rec["kind"], " ".join(sorted(words(rec["question"]))) + "|" + rec["answer"].lower())
    if key in seen:
        return "duplicate"
    seen.add(key)
    return None


def training_rows(records: list[dict[str, Any]], aug: AugmentSection) -> list[dict[str, Any]]:
    """The accepted samples as training rows, each with its kind's loss weight (a pseudo-subject's
    rehearsal times ``augment.pseudo_weight``, so arithmetic items cannot outweigh facts)."""
    return [
        {"id": r["id"], "question": r["question"], "answer": r["answer"], "kind": r["kind"],
         "weight": getattr(aug.weights, r["kind"]) * (aug.pseudo_weight if r.get("pseudo") else 1.0)}
        for r in records
        if r["accepted"]
    ]  # fmt: skip


def stale_oracle(rows: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Per subject, every ``previous_answer`` its facts had in ``rows`` (the training rows up to the
    stage) that is no current gold of the subject: the values an accepted row must not state.
    A diagnostic only: the method never reads ``previous_answer``."""
    old: dict[str, set[str]] = defaultdict(set)
    gold: dict[str, dict[str, str]] = defaultdict(dict)
    for r in rows:
        if r.get("subject"):
            gold[r["subject"]][str(fact_key(r))] = r["answer"]
            if r.get("previous_answer"):
                old[r["subject"]].add(r["previous_answer"])
    return {s: {v for v in vals if v not in gold[s].values()} for s, vals in old.items()}


def stale_accepted(rec: dict[str, Any], oracle: dict[str, set[str]]) -> bool:
    """Whether an accepted record states (whole words) a superseded value of its subject."""
    text = f"{rec['question']} {rec['answer']}"
    return bool(rec.get("accepted")) and any(states(text, v) for v in oracle.get(rec.get("subject") or "", ()))


def acceptance(records: list[dict[str, Any]], oracle: dict[str, set[str]] | None = None) -> dict[str, float]:
    """Generated and accepted counts per kind, and the rejection reasons; with ``oracle``
    (:func:`stale_oracle`), ``aug_<kind>_stale_accepted``: accepted rows stating a superseded value."""
    m: dict[str, float] = {}
    for kind in KINDS:
        mine = [r for r in records if r["kind"] == kind]
        m[f"aug_{kind}_generated"] = len(mine)
        m[f"aug_{kind}_accepted"] = sum(r["accepted"] for r in mine)
        if oracle is not None:
            m[f"aug_{kind}_stale_accepted"] = sum(stale_accepted(r, oracle) for r in mine)
    for r in records:
        if not r["accepted"]:
            m[f"aug_rejected_{r['reason']}"] = m.get(f"aug_rejected_{r['reason']}", 0) + 1
    m["aug_generated"] = len(records)
    m["aug_accepted"] = sum(r["accepted"] for r in records)
    if oracle is not None:
        m["aug_stale_accepted"] = sum(stale_accepted(r, oracle) for r in records)
    return m
