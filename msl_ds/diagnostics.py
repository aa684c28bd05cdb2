"""Diagnostics of the method that read the world's answers: reported, never used to train.

Everything here compares what the method did with the data's golds (or the ``previous_answer``
oracle). The method's own modules (``probe``, ``augment``, ``trainer``, ``kernels``) never import
this module (a test checks it), so no gold beyond the stage's training rows can reach training.

* :func:`rehearsal_metrics` / :func:`rehearsal_scores` — of the statements the model rehearsed (its own descriptions of
  subjects, kept by :func:`msl_ds.augment.consistent_statements`), the share true in the current
  world (*precision*), and the share of earlier facts that some accepted rehearsal states
  (*coverage*);
* :func:`collateral_damage` — accuracy, before and after the stage, on the facts whose current
  gold L_NP pushed down as some other fact's candidate.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from msl_ds.augment import statements
from msl_ds.facts import WorldState, fact_key
from msl_ds.skills import relation_words


def _key(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def rehearsal_metrics(records: list[dict[str, Any]], world, stage: int, stages: list[int], fmt: str) -> dict:
    """:func:`rehearsal_scores` of stage ``stage`` of a run over ``stages`` of ``world`` (a
    :class:`msl_ds.data.World`): facts and golds from the training rows stated so far."""
    keep = [s for s in sorted(world.stages) if s <= stage and (s == 0 or s in stages)]
    rows = [r for s in keep for r in world.split(s, "train")]
    state = world.state(stage, ("train",), stages)
    return rehearsal_scores(records, rows, state, world.split(stage, "train"), fmt)


def rehearsal_scores(
    records: list[dict[str, Any]], rows: list[dict[str, Any]], state: WorldState, stage_rows: list[dict[str, Any]],
    background_fact: str,
) -> dict[str, float]:  # fmt: skip
    """Precision and coverage of the accepted rehearsals (``records``: the stage's augment records).

    ``rows``: every training row stated so far (stage 0 and the run's stages up to this one),
    giving each fact's subject and relation; ``state``: the world after this stage (its golds);
    ``stage_rows``: this stage's training rows (their facts are not "earlier");
    ``background_fact``: the statement format (``skills.background_fact``). A statement is true
    when it is the format filled with a fact's current gold.
    """
    facts: dict[str, tuple[str, str]] = {}
    for r in rows:
        if r.get("subject") and r.get("relation"):
            facts[fact_key(r)] = (r["subject"], r["relation"])
    true: dict[str, str] = {}  # normalised true statement -> fact
    for k, (subject, relation) in facts.items():
        if k in state.gold:
            sentence = background_fact.format(relation=relation_words(relation), subject=subject, answer=state.gold[k])
            true[_key(sentence)] = k
    # a statement *about* a fact: the format's text before the answer
    about = {
        _key(background_fact.format(relation=relation_words(rel), subject=subj, answer="\x00").split("\x00")[0]): k
        for k, (subj, rel) in facts.items()
    }
    said = [
        _key(s) for rec in records if rec["kind"] == "rehearsal" and rec["accepted"] for s in statements(rec["answer"])
    ]
    n_true = sum(s in true for s in said)
    stated = {k for s in said for prefix, k in about.items() if prefix and s.startswith(prefix + " ")}
    now = {fact_key(r) for r in stage_rows}
    earlier = {k for k in facts if k not in now and k in state.gold}
    nan = float("nan")
    return {
        "rehearsal_statements": len(said),
        "rehearsal_precision": n_true / len(said) if said else nan,
        "rehearsal_coverage": len(stated & earlier) / len(earlier) if earlier else nan,
    }


def collateral_damage(
    probed: list[dict[str, Any]] | None, before: list[dict[str, Any]], after: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """Accuracy on the facts whose gold was pushed down as another fact's candidate, before and after.

    ``probed``: the stage's probe records, marked by :func:`msl_ds.probe.mark_push_down` (each
    pushed candidate's ``gold_of`` lists the facts whose gold it holds); ``before``: π_{t-1}'s
    scored answers (any sets; a fact's accuracy is the mean over its rows); ``after``: π_t's
    scored answers per set. Facts without evaluated rows on both sides are left out; without such
    facts the accuracies are None.
    """
    hit = {f for r in probed or [] for c in r["candidates"] if c.get("push") for f in c.get("gold_of", [])}

    def acc(rows: list[dict[str, Any]]) -> dict[str, float]:
        by: dict[str, list[bool]] = {}
        for r in rows:
            if r["fact"] in hit:
                by.setdefault(r["fact"], []).append(bool(r["correct"]))
        return {k: sum(v) / len(v) for k, v in by.items()}

    b, a = acc(before), acc([r for rs in after.values() for r in rs])
    both = sorted(set(b) & set(a))
    return {
        "collateral_facts": len(both),
        "collateral_before": sum(b[k] for k in both) / len(both) if both else None,
        "collateral_after": sum(a[k] for k in both) / len(both) if both else None,
    }


def earlier_answers(before: list[dict[str, Any]], prev_model: str | Path) -> list[dict[str, Any]]:
    """π_{t-1}'s scored answers: the stage's pre-evaluation plus, when π_{t-1} is a stage of this
    run (``<stage dir>/hf``), that stage's ``eval.jsonl``."""
    from msl_ds.io import read_jsonl

    path = Path(prev_model).parent / "eval.jsonl"
    return before + (read_jsonl(path) if Path(prev_model).name == "hf" and path.is_file() else [])
