"""Instruction-skill examples that self-distillation needs, derived from any §4 dataset.

A base model built from scratch must learn, besides its facts, to (1) paraphrase a question,
(2) describe what it knows about a subject (background), and (3) expand a question by one
logical step while keeping its answer. All three come from ``subject``, ``relation`` and the
several phrasings of each fact in a world's stage-0 training data; nothing here knows the
built-in world. Prompt templates come from the ``skills`` config section, and the augmentation
phase uses the same templates, so the model is asked exactly what it learned.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from msl_ds.config import SkillsSection


def _facts(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    by_fact: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("subject") and r.get("relation"):
            by_fact[(r["subject"], r["relation"])].append(r)
    return dict(sorted(by_fact.items()))


def relation_words(relation: str) -> str:
    return relation.replace("_", " ")


def background_text(subject: str, facts: list[tuple[str, str]], cfg: SkillsSection) -> str:
    """What is known about ``subject``: one sentence per (relation, answer)."""
    return " ".join(
        cfg.background_fact.format(relation=relation_words(rel), subject=subject, answer=ans) for rel, ans in facts
    )


def skill_rows(rows: list[dict[str, Any]], cfg: SkillsSection, seed: int = 0) -> list[dict[str, Any]]:
    """Question/answer rows teaching paraphrase, background and expansion for ``rows``' facts."""
    rng = random.Random(seed)
    by_fact = _facts(rows)
    by_subject: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for (subject, relation), phr in by_fact.items():
        by_subject[subject].append((relation, phr[0]["answer"]))
    out: list[dict[str, Any]] = []
    for (subject, relation), phr in by_fact.items():
        questions = sorted({r["question"] for r in phr})
        if len(questions) > 1:  # paraphrase: one phrasing -> another (rotating which, per fact)
            i = rng.randrange(len(questions))
            q, other = questions[i], questions[(i + 1) % len(questions)]
            out.append(_row(f"skill/paraphrase/{subject}/{relation}", cfg.paraphrase_prompt.format(question=q), other))
        siblings = [(rel, ans) for rel, ans in by_subject[subject] if rel != relation]
        if siblings:  # expansion: a question reasoning via a sibling fact, same answer
            rel2, ans2 = rng.choice(siblings)
            q = questions[0]
            expanded = cfg.expansion_question.format(
                relation=relation_words(rel2), subject=subject, answer=ans2, question=q
            )
            out.append(_row(f"skill/expansion/{subject}/{relation}", cfg.expansion_prompt.format(question=q), expanded))
            out.append(_row(f"skill/expanded/{subject}/{relation}", expanded, phr[0]["answer"]))
    for subject, facts in sorted(by_subject.items()):
        facts = sorted(facts)[: cfg.max_background_facts]
        out.append(
            _row(
                f"skill/background/{subject}",
                cfg.background_prompt.format(subject=subject),
                background_text(subject, facts, cfg),
            )
        )
    return out


def _row(row_id: str, question: str, answer: str) -> dict[str, Any]:
    return {"id": row_id, "question": question, "answer": answer, "kind": "skill"}
