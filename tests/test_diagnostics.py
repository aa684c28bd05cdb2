"""Rehearsal precision/coverage, collateral damage, and the wall between diagnostics and the method."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from msl_ds.augment import consistent_statements, select, statements
from msl_ds.config import SelectSection
from msl_ds.diagnostics import collateral_damage, earlier_answers, rehearsal_scores
from msl_ds.facts import WorldState
from msl_ds.io import write_jsonl

FMT = "{relation} of {subject}: {answer}."
REPO = Path(__file__).resolve().parent.parent


def test_consistent_statements_keep_what_samples_agree_on():
    greedy = "headquarters of Felstesbo: Pumu. maker of Felstesbo: Kadrix. mayor of Felstesbo: Lif."
    assert statements(greedy) == [
        "headquarters of Felstesbo: Pumu.",
        "maker of Felstesbo: Kadrix.",
        "mayor of Felstesbo: Lif.",
    ]
    samples = [
        "headquarters of Felstesbo: Pumu. maker of Felstesbo: Nestol.",
        "Headquarters of Felstesbo: pumu! mayor of Felstesbo: Lif.",
        "maker of Felstesbo: Kadrixa.",  # not the same words: no agreement
        "",
    ]
    assert consistent_statements(greedy, samples, 0.5) == ["headquarters of Felstesbo: Pumu."]
    assert consistent_statements(greedy, samples, 0.25) == [
        "headquarters of Felstesbo: Pumu.",
        "mayor of Felstesbo: Lif.",
    ]
    assert consistent_statements(greedy, [], 0.5) == []


def test_inconsistent_rehearsal_is_rejected():
    rec = {
        "kind": "rehearsal", "source_id": "subject/Felstesbo", "subject": "Felstesbo", "prompt": "Tell me about Felstesbo.",
        "raw": "mayor of Felstesbo: Lif.", "finished": True, "question": "Tell me about Felstesbo.", "answer": "",
        "stage_golds": [], "consistent": 0, "statements": 1,
    }  # fmt: skip
    select([rec], SelectSection())
    assert (rec["accepted"], rec["reason"]) == (False, "inconsistent")


def rows(*facts):
    return [{"id": f"{s}/{r}", "subject": s, "relation": r, "answer": a, "question": "?"} for s, r, a in facts]


def test_rehearsal_precision_and_coverage():
    earlier = rows(("Felstesbo", "headquarters", "Pumu"), ("Felstesbo", "maker", "Kadrix"), ("Lugron", "mayor", "Lif"))
    stage = rows(("Lugron", "country", "Popos"))
    state = WorldState.build([(0, earlier), (1, stage)], 1)
    recs = [
        {
            "kind": "rehearsal",
            "accepted": True,
            "answer": "headquarters of Felstesbo: Pumu. maker of Felstesbo: Nestol.",
        },
        {"kind": "rehearsal", "accepted": True, "answer": "country of Lugron: Popos."},
        {"kind": "rehearsal", "accepted": False, "answer": "mayor of Lugron: Lif."},  # rejected: not rehearsed
        {"kind": "paraphrase", "accepted": True, "answer": "Pumu"},
    ]
    m = rehearsal_scores(recs, earlier + stage, state, stage, FMT)
    assert m["rehearsal_statements"] == 3
    assert m["rehearsal_precision"] == pytest.approx(2 / 3)  # the stale maker is false
    assert m["rehearsal_coverage"] == pytest.approx(2 / 3)  # headquarters and maker of the 3 earlier facts


def scored(fact, correct, set_name="stage_00"):
    return {"id": f"{fact}/{correct}", "fact": fact, "correct": correct, "set": set_name}


def test_collateral_damage_before_and_after(tmp_path):
    probed = [
        {"candidates": [{"push": True, "gold_of": ["b", "c"]}, {"push": False, "gold_of": ["d"]}, {"role": "aligned"}]},
        {"candidates": [{"push": True, "gold_of": []}]},
    ]
    before = [scored("b", True), scored("b", True), scored("c", True), scored("d", True)]
    after = {"stage_00": [scored("b", False), scored("b", True), scored("c", True)], "retain": [scored("d", False)]}
    m = collateral_damage(probed, before, after)
    assert m == {"collateral_facts": 2, "collateral_before": 1.0, "collateral_after": pytest.approx(0.75)}
    assert collateral_damage([], before, after)["collateral_before"] is None
    # π_{t-1}'s answers: the pre-evaluation plus the previous stage's eval.jsonl when π_{t-1} is a stage of the run
    write_jsonl(tmp_path / "stage_01" / "eval.jsonl", [scored("e", True)])
    assert earlier_answers(before, tmp_path / "stage_01" / "hf") == before + [scored("e", True)]
    assert earlier_answers(before, tmp_path / "base") == before


def test_method_never_imports_the_diagnostics():
    """The world's answers reach reports only: no module of the method imports msl_ds.diagnostics."""
    method = [
        "probe.py",
        "augment.py",
        "trainer.py",
        "data.py",
        "skills.py",
        *(f"kernels/{p.name}" for p in (REPO / "msl_ds/kernels").glob("*.py")),
    ]
    for name in method:
        tree = ast.parse((REPO / "msl_ds" / name).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any("diagnostics" in m for m in imported), name
