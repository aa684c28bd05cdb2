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


def test_marker_fingerprints_large_files_by_size_and_ends(tmp_path, monkeypatch):
    """Large files are vouched for by size + hash of the first and last MiB, not read whole."""
    big = tmp_path / "hf" / "model.safetensors"
    big.parent.mkdir()
    data = bytearray(os.urandom(3 * io.ENDS_BYTES + 17))
    big.write_bytes(bytes(data))
    io.write_marker(tmp_path, ["hf"])
    rec = io.read_json(tmp_path / io.MARKER)["files"]["hf/model.safetensors"]
    assert rec["size"] == len(data) and len(rec["ends_sha256"]) == 64
    reads = []
    real_open = open

    def counting_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        if "b" in mode:
            orig = f.read
            f.read = lambda n=-1: (reads.append(n), orig(n))[1]
        return f

    monkeypatch.setattr("builtins.open", counting_open)
    assert io.marker_ok(tmp_path)
    assert sum(reads) == 2 * io.ENDS_BYTES  # two MiB read, not 3 MiB + 17 bytes
    monkeypatch.undo()
    for offset in (0, len(data) - 1):  # a changed first or last byte voids the marker
        data[offset] ^= 0xFF
        big.write_bytes(bytes(data))
        assert not io.marker_ok(tmp_path)
        data[offset] ^= 0xFF
    big.write_bytes(bytes(data[:-1]))  # truncated: the size alone says so
    assert not io.marker_ok(tmp_path)
    big.write_bytes(bytes(data))
    assert io.marker_ok(tmp_path)


def test_marker_from_before_fingerprints_still_verifies(tmp_path):
    """A DONE.json written with full-file sha256 digests (older runs) is still checked, and trusted."""
    (tmp_path / "metrics.json").write_text("{}")
    io.write_json(tmp_path / io.MARKER, {"files": {"metrics.json": io.sha256(tmp_path / "metrics.json")}})
    assert io.marker_ok(tmp_path)
    (tmp_path / "metrics.json").write_text("{ }")
    assert not io.marker_ok(tmp_path)


def test_stage_done_and_discarded_checkpoints(tmp_path):
    """One process: the rank-0 verdict is marker_ok's; discard removes the stage's ckpt/ whole."""
    from msl_ds.engine import Checkpoints, stage_done

    (tmp_path / "metrics.json").write_text("{}")
    ckpt = tmp_path / "ckpt"
    (ckpt / "step_000004").mkdir(parents=True)
    (ckpt / "step_000004" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    io.write_json(ckpt / "LATEST.json", {"tag": "step_000004", "step": 4})
    assert not stage_done(tmp_path)
    io.write_marker(tmp_path, ["metrics.json"])
    assert stage_done(tmp_path)
    Checkpoints(ckpt, 1).discard()
    assert not ckpt.exists() and stage_done(tmp_path)  # the marker does not vouch for ckpt/
    Checkpoints(ckpt, 1).discard()  # nothing left: a no-op
    assert Checkpoints(ckpt, 1).latest() is None
