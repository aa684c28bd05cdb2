"""The authors' substring protocol and the continual-learning metrics."""

from __future__ import annotations

import math

from msl_ds.evaluation import acc_bwt, accuracy, is_correct, markdown_table, outdated_share, score, transfer


def test_substring_protocol():
    assert is_correct("The CEO is Kalin Marr.", "kalin marr")
    assert not is_correct("Kalin", "Kalin Marr")


def test_score_marks_outdated_answers():
    rows = [
        {"id": "1", "question": "q", "answer": "Bob", "previous_answer": "Ann"},
        {"id": "2", "question": "q", "answer": "Cy", "previous_answer": "Dee"},
    ]
    out = score(rows, [{"text": "Ann", "finished": True}, {"text": "Cy", "finished": True}])
    assert [r["correct"] for r in out] == [False, True]
    assert [r["outdated"] for r in out] == [True, False]
    assert outdated_share(out) == 0.5


def test_transfer_kgr_krr():
    before = [{"id": str(i), "correct": c} for i, c in enumerate([True, True, False, False, False])]
    after = [{"id": str(i), "correct": c} for i, c in enumerate([True, False, True, True, False])]
    m = transfer(before, after)
    assert m["old_acc"] == 0.4 and m["new_acc"] == 0.6
    assert m["kgr"] == 2 / 3 and m["krr"] == 0.5


def test_transfer_empty_denominators_are_nan():
    m = transfer([{"id": "a", "correct": True}], [{"id": "a", "correct": True}])
    assert math.isnan(m["kgr"]) and m["krr"] == 1.0


def test_acc_bwt():
    R = {0: {0: 0.9}, 1: {0: 0.8, 1: 1.0}, 2: {0: 0.7, 1: 0.5, 2: 0.9}}
    m = acc_bwt(R)
    assert math.isclose(m["acc"], (0.7 + 0.5 + 0.9) / 3)
    assert math.isclose(m["bwt"], ((0.7 - 0.9) + (0.5 - 1.0)) / 2)


def test_accuracy_and_table():
    assert accuracy([{"correct": True}, {"correct": False}]) == 0.5
    t = markdown_table([{"stage": 1, "new_acc": 0.5, "matrix": {"0": {"0": 1.0}, "1": {"0": 0.9, "1": 0.5}}}])
    assert "| 1 | —" in t and "| 1 | 0.900 | 0.500 |" in t
