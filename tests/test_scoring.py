"""Scoring against the current world: fact identity, superseded golds, acc_world, the authors' formulas."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from msl_ds.data import DataError, load_world
from msl_ds.evaluation import json_safe, rescore, score, stage_scores, transfer
from msl_ds.facts import WorldState, fact_key

# A 4-fact world. A changes in stage 1 and again in stage 3; B never changes (two test
# phrasings); C is new in stage 2; D has no identity fields (its own fact, never superseded).
A0 = {"fact_id": "acme/ceo", "subject": "Acme", "relation": "ceo"}
B0 = {"subject": "Zed", "relation": "capital"}
WORLD = {
    0: {
        "train": [
            {"question": "Who runs Acme?", "answer": "Ann", **A0},
            {"question": "Capital of Zed?", "answer": "Qua", **B0},
            {"question": "What is 2 plus 3?", "answer": "5"},
        ],
        "valid": [
            {"question": "Acme's boss?", "answer": "Ann", **A0},
            {"question": "Zed's capital?", "answer": "Qua", **B0},
            {"question": "2 plus 3 makes?", "answer": "5"},
        ],
        "test": [
            {"question": "Head of Acme?", "answer": "Ann", **A0},
            {"question": "Zed: capital?", "answer": "Qua", **B0},
            {"question": "Which city is Zed's capital?", "answer": "Qua", **B0},
            {"question": "Sum of 2 and 3?", "answer": "5"},
        ],
    },
    1: {
        "train": [{"question": "Who runs Acme?", "answer": "Bob", "previous_answer": "Ann", **A0}],
        "valid": [{"question": "Acme's boss?", "answer": "Bob", "previous_answer": "Ann", **A0}],
        "test": [{"question": "Head of Acme?", "answer": "Bob", "previous_answer": "Ann", **A0}],
    },
    2: {
        "train": [{"question": "Who founded Yop?", "answer": "Dee", "subject": "Yop", "relation": "founder"}],
        "valid": [{"question": "Yop's founder?", "answer": "Dee", "subject": "Yop", "relation": "founder"}],
        "test": [{"question": "Founder of Yop?", "answer": "Dee", "subject": "Yop", "relation": "founder"}],
    },
    3: {
        "train": [{"question": "Who runs Acme?", "answer": "Cid", "previous_answer": "Bob", **A0}],
        "valid": [{"question": "Acme's boss?", "answer": "Cid", "previous_answer": "Bob", **A0}],
        "test": [{"question": "Head of Acme?", "answer": "Cid", "previous_answer": "Bob", **A0}],
    },
}


def write_world(root: Path) -> Path:
    for t, splits in WORLD.items():
        for split, rows in splits.items():
            d = root / f"stage_{t:02d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{split}.jsonl").write_text(
                "".join(json.dumps({"id": f"s{t}/{split}/{i}", **r}) + "\n" for i, r in enumerate(rows))
            )
    (root / "retain.jsonl").write_text(json.dumps({"question": "Zed: capital?", "answer": "Qua", **B0}) + "\n")
    (root / "retain_valid.jsonl").write_text(json.dumps({"question": "Zed's capital?", "answer": "Qua", **B0}) + "\n")
    return root


def simulate(world, answer, stages=(1, 2, 3)):
    """The recipe's evaluation with a scripted model: ``answer(question, after_stage)``."""
    split = ("train", "test")
    metrics, matrix = [], {}
    for t in stages:
        now = world.state(t, split)
        out = lambda rows, i: [{"text": answer(r["question"], i), "finished": True} for r in rows]  # noqa: E731
        before = [dict(r, set="now") for r in score(world.split(t, "test"), out(world.split(t, "test"), t - 1), now)]
        if t == stages[0]:
            prev = world.state(t - 1, split)
            before += [
                dict(r, set="stage_00") for r in score(world.split(0, "test"), out(world.split(0, "test"), 0), prev)
            ]
        results = {
            f"stage_{j:02d}": score(world.split(j, "test"), out(world.split(j, "test"), t), now) for j in range(t + 1)
        }
        m = stage_scores(t, before, results, matrix)
        matrix = m["matrix"]
        metrics.append(m)
    return metrics


CURRENT = {  # what a model that learned every update answers after stage i
    "Head of Acme?": {0: "Ann", 1: "Bob", 2: "Bob", 3: "Cid"},
    "Zed: capital?": "Qua",
    "Which city is Zed's capital?": "Qua",
    "Sum of 2 and 3?": "5",
    "Founder of Yop?": "Dee",
}


def current_model(q, i):
    a = CURRENT[q]
    return f"It is {a[i] if isinstance(a, dict) else a}."


def test_fact_keys():
    assert fact_key({"id": "x", "fact_id": "f1", "subject": "S", "relation": "r"}) == "f1"
    assert fact_key({"id": "x", "subject": "S", "relation": "r"}) == "S :: r"
    assert fact_key({"id": "x", "subject": "S"}) == "row x"


def test_state_handles_several_changes(tmp_path):
    world = load_world(write_world(tmp_path / "w"))
    s = world.state(3, ("train", "test"))
    assert s.gold["acme/ceo"] == "Cid" and s.superseded["acme/ceo"] == ["Ann", "Bob"]
    assert world.state(2, ("train", "test")).gold["acme/ceo"] == "Bob"
    assert world.state(0, ("train", "test")).gold["acme/ceo"] == "Ann"
    assert "Zed :: capital" not in s.superseded and "row s0/test/3" in s.gold  # D: its own fact


def test_model_with_current_values_is_right_everywhere(tmp_path):
    world = load_world(write_world(tmp_path / "w"))
    metrics = simulate(world, current_model)
    last = metrics[-1]
    assert all(v == 1.0 for row in last["matrix"].values() for v in row.values())
    assert last["acc_world"] == 1.0 and last["acc_world_facts"] == 4
    assert last["outdated_world"] == 0.0 and last["outdated_world_facts"] == 1  # A is the one changed fact
    assert last["acc"] == 1.0 and last["bwt"] == 0.0


def test_model_with_superseded_value_is_wrong_and_outdated(tmp_path):
    world = load_world(write_world(tmp_path / "w"))

    def stale(q, i):  # keeps stage 1's value of A after stage 3, and half-forgets B
        if q == "Head of Acme?":
            return "Bob" if i >= 1 else "Ann"
        if q == "Which city is Zed's capital?":
            return "No idea"
        return current_model(q, i)

    last = simulate(world, stale)[-1]
    # after stage 3, A's rows in stages 0, 1 and 3 all ask for Cid: "Bob" is wrong there, and outdated
    # (stage 0's column: A wrong, B right once and wrong once, D right)
    assert last["matrix"]["3"] == {"0": 0.5, "1": 0.0, "2": 1.0, "3": 0.0}
    # by hand: A 0, B mean(1, 0) = 0.5, C 1, D 1 -> (0 + 0.5 + 1 + 1) / 4
    assert last["acc_world"] == pytest.approx(0.625)
    assert last["outdated_world"] == 1.0 and last["outdated"] == 1.0
    assert last["acc"] == pytest.approx((0.5 + 0 + 1 + 0) / 4)
    # the old scoring (each stage's own gold) would have called stage 1's column right
    old = score(world.split(1, "test"), [{"text": "Bob", "finished": True}], None)
    assert (
        old[0]["correct"]
        and not score(world.split(1, "test"), [{"text": "Bob", "finished": True}], world.state(3, ("train", "test")))[
            0
        ]["correct"]
    )


def test_rows_record_fact_gold_and_stated_gold(tmp_path):
    world = load_world(write_world(tmp_path / "w"))
    r = score(world.split(1, "test"), [{"text": "Bob", "finished": True}], world.state(3, ("train", "test")))[0]
    assert r["fact"] == "acme/ceo" and r["gold"] == "Cid" and r["stated_gold"] == "Bob"
    assert r["correct"] is False and r["outdated"] is True and r["superseded"] == ["Ann", "Bob"]
    # re-scoring the stored answer against another state gives that state's verdict
    again = rescore(
        [dict(r, set="stage_01")], {x["id"]: x for x in world.split(1, "test")}, world.state(2, ("train", "test"))
    )
    assert again[0]["correct"] is True and "stated_gold" not in again[0] and again[0]["set"] == "stage_01"


def test_authors_formulas_pinned():
    before = [{"id": i, "correct": c} for i, c in enumerate([True, False, False, True, False])]
    after = [{"id": i, "correct": c} for i, c in enumerate([True, True, False, False, True])]
    got = transfer(before, after)
    assert got == {"old_acc": 0.4, "new_acc": 0.6, "kgr": 2 / 3, "kgr_n": 3, "krr": 0.5, "krr_n": 2}
    empty = transfer(after[:0], after[:0])
    assert math.isnan(empty["krr"]) and empty["krr_n"] == 0
    assert json.loads(json.dumps(json_safe(empty)))["krr"] is None  # never NaN in JSON


def test_valid_split_never_opens_a_test_phrasing(tmp_path):
    root = write_world(tmp_path / "w")
    for p in [*root.glob("stage_*/test.jsonl"), root / "retain.jsonl"]:
        p.write_text("this is not JSON\n")  # any read of a test file would fail
    world = load_world(root, ("train", "valid"), "valid")
    assert not [p for p in world.read if "test" in p.name or p.name == "retain.jsonl"]
    assert world.retain[0]["question"] == "Zed's capital?"
    assert world.state(3, ("train", "valid")).gold["acme/ceo"] == "Cid"
    with pytest.raises(DataError, match="malformed JSON"):
        load_world(root, ("train", "test"), "test")


def test_two_answers_for_one_fact_in_one_stage_refused(tmp_path):
    root = write_world(tmp_path / "w")
    (root / "stage_01" / "test.jsonl").write_text(
        json.dumps({"id": "x", "question": "Head of Acme?", "answer": "Eve", **A0}) + "\n"
    )
    with pytest.raises(DataError, match="acme/ceo.*2 different answers in stage 1"):
        load_world(root, ("train", "test")).state(1, ("train", "test"))


def test_world_state_build_orders_stages():
    rows = lambda a: [{"id": a, "question": "q", "answer": a, "fact_id": "f"}]  # noqa: E731
    s = WorldState.build([(2, rows("c")), (0, rows("a")), (1, rows("b"))], 2)
    assert s.gold["f"] == "c" and s.superseded["f"] == ["a", "b"] and s.stated_at["f"] == 2
