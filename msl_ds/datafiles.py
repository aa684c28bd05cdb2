"""Reading a user's data files: file kinds, row formats and column names.

A split is one file or one saved dataset, found by name in a stage directory:
``<split>.jsonl`` (JSON Lines), ``<split>.json`` (a JSON array, or JSON Lines), ``<split>.parquet``,
``<split>.csv``, or a ``<split>/`` directory written by ``datasets.Dataset.save_to_disk``. Every kind
is read through ``datasets``; when ``datasets`` cannot read a JSON file, the file is scanned by hand
so that the error names its line.

Rows come in one of three formats (``data.format``):

- ``rows``: ``{"question", "answer", ...}`` (the authors' ``Question``/``Answer`` work too);
- ``alpaca``: ``{"instruction", "input", "output"}``: question = instruction, plus a blank line and
  the input when there is one; answer = output;
- ``messages``: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}``, one
  user and one assistant turn (a leading system turn is refused: msl_ds has no place for it).

``data.columns`` renames the user's columns first: ``{question: prompt, answer: completion}`` reads
the field ``prompt`` as the question (the same mapping style as LLaMA-Factory's ``columns``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("rows", "alpaca", "messages")
EXTENSIONS = ("jsonl", "json", "parquet", "csv")
ALIASES = {"Question": "question", "Answer": "answer"}


class DataError(ValueError):
    """Bad input data; the message names the file, line and field."""


@dataclass(frozen=True)
class DataSource:
    """How to read rows: the format and the column mapping (``data.format``, ``data.columns``)."""

    format: str = "rows"
    columns: dict[str, str] = field(default_factory=dict)


ROWS = DataSource()  # the default: question/answer rows, no renaming


def find_file(directory: Path, split: str) -> Path | None:
    """The file (or saved-dataset directory) holding ``split`` in ``directory``."""
    for ext in EXTENSIONS:
        p = directory / f"{split}.{ext}"
        if p.is_file():
            return p
    d = directory / split
    if d.is_dir() and ((d / "dataset_info.json").is_file() or (d / "state.json").is_file()):
        return d
    return None


# --------------------------------------------------------------------------- raw records


def read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for every record of a file, ``where`` naming its line (or row)."""
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{path}: a DatasetDict; save one split per directory (stage_NN/train/, test/)")
        return [(f"{path}: row {i}", _drop_none(r)) for i, r in enumerate(ds.to_list(), start=1)]
    if path.suffix in (".jsonl", ".json"):
        return _read_json(path)
    kind = {".parquet": "parquet", ".csv": "csv"}[path.suffix]
    rows = _csv(path) if kind == "csv" else _with_datasets(kind, path)
    first = 2 if kind == "csv" else 1  # a CSV's first line is its header
    label = "line" if kind == "csv" else "row"
    return [(f"{path}:{i}" if label == "line" else f"{path}: row {i}", r) for i, r in enumerate(rows, start=first)]


def _drop_none(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if v is not None}  # datasets fills absent keys with None


def _with_datasets(kind: str, path: Path) -> list[dict[str, Any]]:
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    return [_drop_none(r) for r in ds.to_list()]


def _csv(path: Path) -> list[dict[str, Any]]:
    """Every column as text (a year stays "1987", not 1987); an empty cell is an absent field."""
    import csv

    import datasets

    datasets.disable_progress_bars()
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    features = datasets.Features({c: datasets.Value("string") for c in header})
    ds = datasets.load_dataset(
        "csv", data_files=str(path), split="train", features=features, keep_default_na=False, na_filter=False
    )
    return [{k: v for k, v in r.items() if v not in (None, "")} for r in ds.to_list()]


def _read_json(path: Path) -> list[tuple[str, dict[str, Any]]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        bad = _field_with_bad_bytes(raw.split(b"\n")[line - 1])
        raise DataError(
            f"{path}:{line}: {bad + ' ' if bad else ''}not valid UTF-8 "
            f"(byte 0x{raw[exc.start]:02x} at file offset {exc.start})"
        ) from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return _json_array(path, text)
    numbered = _json_lines(path, text)
    if not numbered:
        return []
    try:  # the rows as datasets reads them (its types), each with its own line number
        loaded = _with_datasets("json", path)
    except Exception:  # noqa: BLE001 - e.g. one field with two types across rows: the scan is exact
        return [(f"{path}:{i}", obj) for i, obj in numbered]
    if len(loaded) != len(numbered):
        return [(f"{path}:{i}", obj) for i, obj in numbered]
    return [(f"{path}:{i}", row) for (i, _), row in zip(numbered, loaded)]


def _json_lines(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    # split on "\n" only: str.splitlines() also breaks at U+2028 and friends, which JSON strings
    # may hold raw, and would shift every line number after them
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{i}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        rows.append((i, obj))
    return rows


def _json_array(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    """A JSON array of objects; each element is named by the line it starts on."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    decoder = json.JSONDecoder()
    out, pos = [], text.index("[") + 1
    for k, obj in enumerate(items, start=1):
        while text[pos] in " \t\r\n,":
            pos += 1
        line = text.count("\n", 0, pos) + 1
        _, pos = decoder.raw_decode(text, pos)
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line}: element {k} is not a JSON object (got {type(obj).__name__})")
        out.append((f"{path}:{line}", obj))
    return out


def _field_with_bad_bytes(line: bytes) -> str | None:
    """``field 'name'`` for the JSON field whose string holds the undecodable bytes, if any."""
    try:
        obj = json.loads(line.decode("utf-8", errors="surrogateescape"))
    except ValueError:
        return None
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(value, str) and any("\udc80" <= ch <= "\udcff" for ch in value):
                return f"field '{key}'"
    return None


# --------------------------------------------------------------------------- formats


def to_row(obj: dict[str, Any], source: DataSource, where: str) -> dict[str, Any]:
    """One record in the user's format and columns -> msl_ds's field names (not yet validated)."""
    if source.columns:
        renamed = {ours: obj[theirs] for ours, theirs in source.columns.items() if theirs in obj}
        obj = {**{k: v for k, v in obj.items() if k not in source.columns.values()}, **renamed}
    if source.format == "alpaca":
        return _from_alpaca(obj, where)
    if source.format == "messages":
        return _from_messages(obj, where)
    return {ALIASES.get(k, k): v for k, v in obj.items()}


def _from_alpaca(obj: dict[str, Any], where: str) -> dict[str, Any]:
    for name in ("instruction", "output"):
        if not isinstance(obj.get(name), str):
            raise DataError(f"{where}: field '{name}' is missing (data.format=alpaca)")
    question = obj["instruction"].strip()
    extra = obj.get("input")
    if isinstance(extra, str) and extra.strip():
        question = f"{question}\n\n{extra.strip()}"
    rest = {k: v for k, v in obj.items() if k not in ("instruction", "input", "output")}
    return {**rest, "question": question, "answer": obj["output"]}


def _from_messages(obj: dict[str, Any], where: str) -> dict[str, Any]:
    turns = obj.get("messages")
    if not isinstance(turns, list):
        raise DataError(f"{where}: field 'messages' is missing or not a list (data.format=messages)")
    roles = [t.get("role") if isinstance(t, dict) else None for t in turns]
    if roles != ["user", "assistant"]:
        raise DataError(f"{where}: field 'messages' must hold one user turn then one assistant turn, got roles {roles}")
    for t in turns:
        if not isinstance(t.get("content"), str):
            raise DataError(f"{where}: field 'messages': the {t['role']} turn has no string 'content'")
    rest = {k: v for k, v in obj.items() if k != "messages"}
    return {**rest, "question": turns[0]["content"], "answer": turns[1]["content"]}
