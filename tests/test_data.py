"""Stage loading (JSONL, Parquet, the authors' field names), validation errors, batch plans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from msl_ds.data import (
    DataError,
    Example,
    batch_plan,
    collate,
    load_rows,
    load_world,
    micro_batches,
    replay_rows,
)


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_world(root: Path) -> Path:
    s0 = [
        {"id": "a", "question": "Who leads Acme?", "answer": "Ann", "subject": "Acme", "relation": "ceo"},
        {"id": "b", "question": "Where is Acme?", "answer": "Oslo", "subject": "Acme", "relation": "hq"},
    ]
    s1 = [
        {
            "id": "c",
            "question": "Who runs Acme?",
            "answer": "Bob",
            "subject": "Acme",
            "relation": "ceo",
            "previous_answer": "Ann",
            "kind": "conflict",
        }
    ]
    s2 = [{"id": "d", "Question": "Where is Zed?", "Answer": "Rome", "subject": "Zed", "relation": "hq"}]
    for i, rows in enumerate([s0, s1, s2]):
        write_jsonl(root / f"stage_{i:02d}" / "train.jsonl", rows)
        write_jsonl(root / f"stage_{i:02d}" / "test.jsonl", rows)
    return root


def test_load_world_and_aliases(tmp_path):
    w = load_world(make_world(tmp_path))
    assert sorted(w.stages) == [0, 1, 2]
    assert w.split(2, "train")[0]["question"] == "Where is Zed?"
    assert w.split(2, "train")[0]["answer"] == "Rome"
    assert w.split(1, "train")[0]["previous_answer"] == "Ann"
    assert w.retain == [] and w.general == []


def test_parquet_rows(tmp_path):
    import datasets

    rows = [{"Question": "Q1?", "Answer": "A1"}, {"Question": "Q2?", "Answer": "A2"}]
    p = tmp_path / "stage_01" / "train.parquet"
    p.parent.mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(p))
    out = load_rows(p)
    assert [r["answer"] for r in out] == ["A1", "A2"]
    assert out[0]["id"] == "stage_01/train/1"


def test_default_ids_are_file_and_line(tmp_path):
    p = write_jsonl(
        tmp_path / "s" / "train.jsonl", [{"question": "q?", "answer": "a"}, {"question": "r?", "answer": "b"}]
    )
    assert [r["id"] for r in load_rows(p)] == ["s/train/1", "s/train/2"]


def test_missing_test_split(tmp_path):
    write_jsonl(tmp_path / "stage_00" / "train.jsonl", [{"question": "q?", "answer": "a"}])
    with pytest.raises(DataError, match="missing test.jsonl"):
        load_world(tmp_path)


def test_no_stages(tmp_path):
    with pytest.raises(DataError, match="no stage_NN"):
        load_world(tmp_path)


def test_replay_skips_superseded_and_current_facts(tmp_path):
    w = load_world(make_world(tmp_path))
    # stage 2: Acme's ceo changed in stage 1, so the stale stage-0 answer must never come back
    rows = replay_rows(w, 2, n=10, max_buffer=0, seed=0)
    answers = {(r["subject"], r["relation"]): r["answer"] for r in rows}
    assert answers == {("Acme", "ceo"): "Bob", ("Acme", "hq"): "Oslo"}
    # stage 1 updates Acme's ceo: the stage's own facts are not replayed
    assert {r["id"] for r in replay_rows(w, 1, n=10, max_buffer=0, seed=0)} == {"b"}


def test_batch_plan_is_deterministic_and_covers_every_row():
    a = batch_plan(37, micro=4, accum=2, world=2, epochs=2, max_steps=0, seed=3)
    b = batch_plan(37, micro=4, accum=2, world=2, epochs=2, max_steps=0, seed=3)
    assert a == b
    assert all(len(s) == 16 for s in a)
    per_epoch = len(a) // 2
    assert set(x for s in a[:per_epoch] for x in s) == set(range(37))
    assert batch_plan(37, 4, 2, 2, 2, 0, seed=4) != a
    assert len(batch_plan(10, 2, 1, 1, 1, max_steps=12, seed=0)) == 12


def test_micro_batches_partition_the_global_batch():
    gb = list(range(16))
    parts = [mb for r in range(2) for mb in micro_batches(gb, micro=4, accum=2, world=2, rank=r)]
    assert sorted(x for mb in parts for x in mb) == gb


def test_collate_shifts_labels_and_pads():
    ex = [Example([1, 5, 6, 7, 2], [-100, -100, 6, 7, 2], {}), Example([1, 8, 2], [-100, 8, 2], {})]
    b = collate(ex, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7, 2, -100], [8, 2, -100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
