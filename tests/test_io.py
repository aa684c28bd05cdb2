"""Atomic outputs and completion markers."""

from __future__ import annotations

import os

import pytest

from msl_ds import io


def test_write_text_is_atomic_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "metrics.json"
    io.write_json(p, {"a": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        io.write_json(p, {"a": 2})
    monkeypatch.undo()
    assert io.read_json(p) == {"a": 1}  # the old file is intact
    assert [q.name for q in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left


def test_replace_dir_keeps_a_complete_dir(tmp_path):
    final = tmp_path / "hf"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp = tmp_path / "hf.tmp"
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    io.replace_dir(tmp, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_marker_vouches_for_checksums(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"weights")
    assert not io.marker_ok(tmp_path)
    io.write_marker(tmp_path, ["metrics.json", "hf"])
    assert io.marker_ok(tmp_path)
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"truncat")
    assert not io.marker_ok(tmp_path)  # a changed file voids the marker
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"weights")
    assert io.marker_ok(tmp_path)
    (tmp_path / "metrics.json").unlink()
    assert not io.marker_ok(tmp_path)


def test_jsonl_round_trip(tmp_path):
    rows = [{"b": 1, "a": "é"}, {"a": "x"}]
    io.write_jsonl(tmp_path / "r.jsonl", rows)
    assert io.read_jsonl(tmp_path / "r.jsonl") == rows
