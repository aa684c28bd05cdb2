"""Selection of self-distilled augmentations on hand-built samples, and the pieces it rests on."""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from msl_ds.augment import (
    acceptance,
    coverage,
    jaccard,
    pseudo_subjects,
    replace_stale,
    scheduled_subjects,
    select,
    subject_order,
    training_rows,
    window_coverage,
    word_mi,
)
from msl_ds.config import AugmentSection, SelectSection

REPO = Path(__file__).resolve().parent.parent


def q(kind, x, question, y_hat, answer="Pumu", own="Nestol", finished=True, raw=None, **extra):
    return {
        "kind": kind, "source_id": "f1", "subject": "Felstesbo", "prompt": f"Rephrase the question: {x}",
        "raw": question if raw is None else raw, "finished": finished, "question": question, "answer": answer,
        "x": x, "y_hat": y_hat, "own": own, **extra,
    }  # fmt: skip


X = "In which city is Felstesbo headquartered?"


# a stage's training text has a few hundred distinct words
CORPUS = {f"word{i}" for i in range(300)}


def verdicts(records, **sel):
    select(records, dataclasses.replace(SelectSection(reference="gold"), **sel), corpus=CORPUS)  # the paper's rule
    return [(r["accepted"], r["reason"]) for r in records]


def test_word_mi_is_normalised_and_symmetric():
    vocab = 50
    assert word_mi("Pumu", "pumu", vocab) == pytest.approx(1.0)
    assert word_mi("Pumu", "Nestol", vocab) == 0.0
    assert word_mi("", "Pumu", vocab) == 0.0
    part = word_mi(X, "Where is Felstesbo headquartered?", vocab)
    assert 0.2 < part < 1.0
    assert part == pytest.approx(word_mi("Where is Felstesbo headquartered?", X, vocab))
    # sharing more words means more information
    assert word_mi(X, "In which city is Felstesbo based?", vocab) > word_mi(X, "Where is Felstesbo based?", vocab)
    # random texts over a random vocabulary stay in [0, 1]
    rng = random.Random()
    pool = [f"w{i}" for i in range(30)]
    for _ in range(200):
        a, b = " ".join(rng.sample(pool, rng.randint(1, 8))), " ".join(rng.sample(pool, rng.randint(1, 8)))
        assert 0.0 <= word_mi(a, b, len(pool)) <= 1.0


def test_faithful_paraphrase_kept_drifted_dropped():
    recs = [
        q("paraphrase", X, "In which city does Felstesbo have its headquarters?", y_hat="Pumu"),  # faithful
        q("paraphrase", X, "Who is the mayor of Felstesbo?", y_hat="Grergra"),  # drifted: another fact
        q("paraphrase", X, "Which city is home to the head office of Felstesbo?", y_hat="Nestol"),  # other answer
    ]
    assert verdicts(recs) == [(True, "ok"), (False, "low_score"), (False, "low_score")]
    assert recs[0]["score"] > 0.1 > recs[1]["score"]


def test_reference_own_judges_meaning_not_the_new_answer():
    """With the model's own answer to x as reference, a faithful rewrite the model answers as it
    answers x is kept even though the model does not know the new gold yet."""
    recs = [
        q("paraphrase", X, "In which city does Felstesbo have its headquarters?", y_hat="Nestol"),
        q("paraphrase", X, "Who is the mayor of Felstesbo?", y_hat="Grergra"),
    ]
    assert verdicts(recs, reference="own") == [(True, "ok"), (False, "low_score")]


def test_format_rules_apply_even_without_selection():
    recs = [
        q("paraphrase", X, X, y_hat="Pumu"),  # a copy
        q("paraphrase", X, "in which city is Felstesbo headquartered", y_hat="Pumu"),  # same words
        q("paraphrase", X, "In which city is Felstesbo headquartered today?", y_hat="Pumu"),  # near copy
        q("paraphrase", X, "Where are the headquarters of", y_hat="Pumu", finished=False),  # hit the cap
        q("expansion", X, "", y_hat="", raw=""),  # empty
        q("paraphrase", X, "Who is the mayor of Felstesbo?", y_hat="Grergra"),  # drifted: kept without selection
        q("paraphrase", X, "Who is the mayor of Felstesbo?", y_hat="Grergra"),  # the same sample again
        q("paraphrase", X, "In which city is Lugron headquartered?", y_hat="Pumu"),  # another subject
    ]
    got = verdicts(recs, enabled=False, near_copy=0.8)
    assert got == [
        (False, "copy"),
        (False, "copy"),
        (False, "near_copy"),
        (False, "truncated"),
        (False, "empty"),
        (True, "ok"),
        (False, "duplicate"),
        (False, "off_subject"),
    ]
    assert jaccard(X, recs[2]["question"]) >= 0.8


def test_contains_gold_rule_and_top_q():
    recs = [
        q("expansion", X, "Given that Felstesbo is a company, where is Felstesbo headquartered?", y_hat="Pumu"),
        q("expansion", X, "Given that Felstesbo makes bicycles, in which city is it based?", y_hat="city Pumu"),
        q("expansion", X, "Given that Felstesbo is old, name its headquarters city.", y_hat="Nestol"),
    ]
    assert [a for a, _ in verdicts(recs, theta=0.0, contains_gold=True)] == [True, True, False]
    assert recs[2]["reason"] == "answer_lacks_gold"
    got = verdicts(recs, rule="top_q", top_q=0.3)
    best = max(range(3), key=lambda i: recs[i]["score"])
    assert [a for a, _ in got] == [i == best for i in range(3)]
    assert {r for _, r in got} == {"ok", "below_top_q"}


def rehearsal(text, golds=(), subject="Felstesbo"):
    return {
        "kind": "rehearsal", "source_id": f"subject/{subject}", "subject": subject,
        "prompt": f"Tell me about {subject}.", "raw": text, "finished": True,
        "question": f"Tell me about {subject}.", "answer": text, "stage_golds": list(golds),
    }  # fmt: skip


def test_rehearsal_texts_keep_subject_and_new_gold():
    recs = [
        rehearsal("headquarters of Felstesbo: Pumu. maker of Felstesbo: Kadrix.", golds=["Pumu"]),
        rehearsal("headquarters of Felstesbo: Nestol.", golds=["Pumu"]),  # the stale value survived
        rehearsal("headquarters of Lugron: Pumu.", golds=["Pumu"]),  # about something else
        rehearsal("country of Telgrolbel: Popos.", subject="Telgrolbel"),  # another subject, rehearsed
    ]
    assert verdicts(recs) == [(True, "ok"), (False, "gold_missing"), (False, "off_subject"), (True, "ok")]
    assert all(r["score"] is None for r in recs)


def test_replace_stale_whole_words_any_case():
    text = "headquarters of Felstesbo: Nestol. Nestolburg is nearby; NESTOL again."
    assert replace_stale(text, "Nestol", "Pumu") == "headquarters of Felstesbo: Pumu. Nestolburg is nearby; Pumu again."
    assert replace_stale(text, "  ", "Pumu") == text
    assert replace_stale("price: 3.5 (3x5)", "3.5", "4") == "price: 4 (3x5)"


def test_schedule_round_robin_over_earlier_subjects():
    rows = [{"subject": "A"}, {"subject": "B"}, {"subject": "A"}]
    earlier = [{"subject": s} for s in "ABCDEFGH"] + [{"question": "no subject"}]
    # positions 0..7; every=3 at stage 4 (4 % 3 = 1): positions 1, 4, 7 = B, E, H, less the stage's own B
    assert scheduled_subjects(rows, earlier, 3, stage=4) == ["E", "H"]
    assert scheduled_subjects(rows, earlier, 1, stage=4) == list("CDEFGH")
    # a later stage appends subjects; the earlier ones keep their positions, hence their period
    grown = earlier + [{"subject": s} for s in "IJ"]
    assert scheduled_subjects(rows, grown, 3, stage=4) == ["E", "H"]
    assert scheduled_subjects(rows, grown, 3, stage=5) == ["C", "F", "I"]


def test_pseudo_subjects_weighted_and_left_out_of_coverage():
    earlier = [
        {"subject": "Acme", "kind": "base"}, {"subject": "12+30", "kind": "general"},
        {"subject": "Bo", "kind": "base"}, {"subject": "Bo", "kind": "general"},
    ]  # fmt: skip
    assert pseudo_subjects(earlier) == {"12+30"}
    # coverage counts fact subjects only: Acme rehearsed, Bo not -> 1/2 whatever 12+30 gets
    assert coverage([], earlier, {"Acme", "12+30"}) == 0.5
    aug = AugmentSection(pseudo_weight=0.25)
    recs = [
        {"id": "a", "kind": "rehearsal", "question": "q", "answer": "x", "accepted": True, "pseudo": True},
        {"id": "b", "kind": "rehearsal", "question": "q", "answer": "y", "accepted": True, "pseudo": False},
    ]
    assert [r["weight"] for r in training_rows(recs, aug)] == [0.25, 1.0]


@pytest.mark.parametrize("every", [1, 2, 3])
def test_schedule_covers_every_earlier_subject_in_every_window(tiny_world, every):
    """On the tiny world's plan (stages 1-7), every window of ``every`` consecutive stages
    rehearses or trains every fact subject trained before the window: coverage 1.00."""
    from msl_ds.data import load_world

    world = load_world(tiny_world, ("train",), "valid")
    stages = sorted(s for s in world.stages if s >= 1)
    assert len(stages) == 7
    for i in range(len(stages) - every + 1):
        assert window_coverage(world, stages[i : i + every], every) == 1.0, (every, stages[i])
    # and not trivially: a single stage of a k > 1 schedule leaves earlier subjects out
    if every > 1:
        per_stage = [
            coverage(
                world.split(t, "train"),
                world.train_before(t),
                set(scheduled_subjects(world.split(t, "train"), world.train_before(t), every, t)),
            )
            for t in stages
        ]
        assert max(per_stage) < 1.0, per_stage
    # the schedule is every earlier subject at k = 1, the arithmetic items (pseudo-subjects) included
    t = stages[-1]
    planned = scheduled_subjects(world.split(t, "train"), world.train_before(t), 1, t)
    mine = {r["subject"] for r in world.split(t, "train")}
    assert set(planned) == set(subject_order(world.train_before(t))) - mine


def test_training_rows_carry_kind_weights_and_acceptance_counts():
    recs = [
        q("paraphrase", X, "In which city does Felstesbo have its headquarters?", y_hat="Pumu"),
        q("paraphrase", X, "Who is the mayor of Felstesbo?", y_hat="Grergra"),
        rehearsal("headquarters of Felstesbo: Pumu.", golds=["Pumu"]),
    ]
    select(recs, SelectSection(reference="gold"), corpus=CORPUS)
    for i, r in enumerate(recs):
        r["id"] = f"aug/{i}"
    aug = AugmentSection()
    aug.weights.paraphrase, aug.weights.rehearsal = 0.5, 2.0
    rows = training_rows(recs, aug)
    assert [(r["id"], r["kind"], r["weight"]) for r in rows] == [
        ("aug/0", "paraphrase", 0.5),
        ("aug/2", "rehearsal", 2.0),
    ]
    m = acceptance(recs)
    assert (m["aug_paraphrase_generated"], m["aug_paraphrase_accepted"]) == (2, 1)
    assert (m["aug_rehearsal_generated"], m["aug_rehearsal_accepted"]) == (1, 1)
    assert m["aug_rejected_low_score"] == 1 and m["aug_accepted"] == 2


def test_killed_while_writing_leaves_no_dataset(tmp_path):
    """A process killed while writing augment.jsonl leaves no file the next run would read."""
    target = tmp_path / "augment.jsonl"
    code = (
        "import os, signal, sys\n"
        "from msl_ds.io import write_jsonl\n"
        "def rows():\n"
        "    for i in range(1000):\n"
        "        if i == 500: os.kill(os.getpid(), signal.SIGKILL)\n"
        "        yield {'id': i}\n"
        f"write_jsonl({str(target)!r}, rows())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -9
    assert not target.exists()
    # the recipe reads exactly ``augment.jsonl``; leftovers carry another name
    assert all(p.name != "augment.jsonl" for p in tmp_path.iterdir())
