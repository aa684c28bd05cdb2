"""Instruction skills derive from any §4 data: subject, relation and several phrasings."""

from __future__ import annotations

from msl_ds.config import SkillsSection
from msl_ds.skills import skill_rows

ROWS = [
    {"question": "Who leads Acme?", "answer": "Ann Lee", "subject": "Acme", "relation": "chief_executive"},
    {"question": "Acme is led by whom?", "answer": "Ann Lee", "subject": "Acme", "relation": "chief_executive"},
    {"question": "Where is Acme based?", "answer": "Oslo", "subject": "Acme", "relation": "headquarters"},
    {"question": "Which city hosts Acme?", "answer": "Oslo", "subject": "Acme", "relation": "headquarters"},
    {"question": "What is 2 plus 3?", "answer": "5"},  # no subject/relation: no skills from it
]


def test_skill_rows_cover_three_skills():
    cfg = SkillsSection()
    rows = skill_rows(ROWS, cfg)
    kinds = {r["id"].split("/")[1] for r in rows}
    assert kinds == {"paraphrase", "expansion", "expanded", "background"}
    para = [r for r in rows if "/paraphrase/" in r["id"]]
    assert len(para) == 2  # one per fact
    pairs = {
        ("Who leads Acme?", "Acme is led by whom?"),
        ("Acme is led by whom?", "Who leads Acme?"),
        ("Where is Acme based?", "Which city hosts Acme?"),
        ("Which city hosts Acme?", "Where is Acme based?"),
    }
    for r in para:
        assert (r["question"].removeprefix("Rephrase the question: "), r["answer"]) in pairs
    bg = next(r for r in rows if "/background/" in r["id"])
    assert bg["question"] == "Tell me about Acme."
    assert "chief executive of Acme: Ann Lee." in bg["answer"] and "headquarters of Acme: Oslo." in bg["answer"]
    expanded = [r for r in rows if "/expanded/" in r["id"]]
    for r in expanded:  # the expanded question keeps the original answer
        gold = "Ann Lee" if "chief_executive" in r["id"] else "Oslo"
        assert r["answer"] == gold and r["question"].startswith("Given that")
    assert all(r["answer"] not in r["question"] for r in expanded)
