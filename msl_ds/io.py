"""Atomic file output and completion markers.

Everything msl_ds writes that a later run trusts goes through here: a file or directory is
written under a temporary name, flushed, and renamed into place, and a stage counts as done only
when its marker (with the fingerprints of what it vouches for: size and the hash of both
ends, see ``fingerprint``) exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (temp file in the same dir, fsync, rename)."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.tmp-", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(p.parent)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Move the finished directory ``tmp`` to ``final``, replacing an older one.

    The old directory is renamed aside first and removed only after the new one is in place, so
    at every instant either the old or the new complete directory sits under ``final``.
    """
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# a file's fingerprint: its size and the sha256 of its first and last ENDS_BYTES (the whole file
# when it is at most twice that): a truncated, re-written or swapped export changes one of them,
# and a 16 GB shard is vouched for by reading 2 MiB of it instead of all of it
ENDS_BYTES = 1 << 20


def fingerprint(path: str | Path, ends: int = ENDS_BYTES) -> dict[str, Any]:
    """``{"size": bytes, "ends_sha256": hex}`` of ``path`` (see ``ENDS_BYTES``)."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= 2 * ends:
            h.update(f.read())
        else:
            h.update(f.read(ends))
            f.seek(size - ends)
            h.update(f.read(ends))
    return {"size": size, "ends_sha256": h.hexdigest()}


def _matches(path: Path, recorded: Any) -> bool:
    """``path`` still has the fingerprint (or, in markers written before fingerprints, the full
    sha256 digest) recorded for it."""
    if not path.is_file():
        return False
    if isinstance(recorded, str):  # an older marker: full-file sha256
        return sha256(path) == recorded
    if not isinstance(recorded, dict) or os.path.getsize(path) != recorded.get("size"):
        return False  # the size first: a stat, no read
    return fingerprint(path) == recorded


def checksums(root: str | Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The fingerprint of each file under ``root`` (a directory name expands to all files below it)."""
    root = Path(root)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        p = root / name
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for q in files:
            out[str(q.relative_to(root))] = fingerprint(q)
    return out


MARKER = "DONE.json"


def write_marker(stage_dir: str | Path, names: Iterable[str], extra: dict[str, Any] | None = None) -> None:
    """Declare ``stage_dir`` complete, vouching for the files ``names`` by fingerprint."""
    d = Path(stage_dir)
    write_json(d / MARKER, {"files": checksums(d, names), **(extra or {})})


def marker_ok(stage_dir: str | Path) -> bool:
    """True when the marker exists and every file it vouches for still has its fingerprint.

    Reads the files on the calling process: in a distributed run call it on one rank and share
    the verdict (``msl_ds.engine.stage_done``) instead of having every rank re-read every export.
    """
    d = Path(stage_dir)
    m = d / MARKER
    if not m.is_file():
        return False
    try:
        files = read_json(m)["files"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(files, dict) and all(_matches(d / name, rec) for name, rec in files.items())
