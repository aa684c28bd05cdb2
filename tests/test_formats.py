"""Your data in the formats people have: JSON Lines, JSON arrays, Parquet, CSV, saved datasets,
Alpaca and messages rows, renamed columns; no stage 0; ``--check`` before any rank starts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_CONFIG, launch_env

from msl_ds.data import DataError, load_world
from msl_ds.datafiles import DataSource

STAGES = (1, 2)
SPLITS = ("train", "test")


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def write_as(world: Path, out: Path, kind: str) -> DataSource:
    """Stages 1-2 of ``world`` (no stage 0) written as ``kind``; the DataSource that reads them."""
    import datasets

    for t in STAGES:
        for split in SPLITS:
            rows = jsonl_rows(world / f"stage_{t:02d}" / f"{split}.jsonl")
            d = out / f"stage_{t:02d}"
            d.mkdir(parents=True, exist_ok=True)
            if kind == "jsonl":
                (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            elif kind == "json_array":
                (d / f"{split}.json").write_text(json.dumps(rows, indent=2))
            elif kind == "parquet":
                datasets.Dataset.from_list(rows).to_parquet(str(d / f"{split}.parquet"))
            elif kind == "csv":
                datasets.Dataset.from_list(rows).to_csv(str(d / f"{split}.csv"), index=False)
            elif kind == "saved":
                datasets.Dataset.from_list(rows).save_to_disk(str(d / split))
            elif kind == "alpaca":
                alp = [{"instruction": r.pop("question"), "input": "", "output": r.pop("answer"), **r} for r in rows]
                (d / f"{split}.json").write_text(json.dumps(alp, indent=1))
            elif kind == "messages":
                msg = [
                    {"messages": [{"role": "user", "content": r.pop("question")},
                                  {"role": "assistant", "content": r.pop("answer")}], **r}
                    for r in rows
                ]  # fmt: skip
                (d / f"{split}.jsonl").write_text("".join(json.dumps(m) + "\n" for m in msg))
            elif kind == "columns":
                ren = [
                    {"prompt": r.pop("question"), "completion": r.pop("answer"), "key": r.pop("fact_id"), **r}
                    for r in rows
                ]
                (d / f"{split}.jsonl").write_text("".join(json.dumps(m) + "\n" for m in ren))
    fmt = kind if kind in ("alpaca", "messages") else "rows"
    cols = {"question": "prompt", "answer": "completion", "fact_id": "key"} if kind == "columns" else {}
    return DataSource(fmt, cols)


KINDS = ("jsonl", "json_array", "parquet", "csv", "saved", "alpaca", "messages", "columns")


def test_every_format_gives_the_same_rows(tiny_world, tmp_path):
    ref = load_world(tiny_world, SPLITS, "test")
    want = {t: {s: ref.split(t, s) for s in SPLITS} for t in STAGES}
    for kind in KINDS:
        source = write_as(tiny_world, tmp_path / kind, kind)
        got = load_world(tmp_path / kind, SPLITS, "test", source)
        assert sorted(got.stages) == list(STAGES), kind  # no stage 0 is fine
        for t in STAGES:
            for s in SPLITS:
                strip = lambda rows: [{k: v for k, v in r.items() if k != "id"} for r in rows]  # noqa: E731
                assert strip(got.split(t, s)) == strip(want[t][s]), (kind, t, s)


def test_format_errors_name_file_line_and_field(tmp_path):
    d = tmp_path / "w" / "stage_01"
    d.mkdir(parents=True)
    (d / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    (d / "train.json").write_text('[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q2"}\n]\n')
    with pytest.raises(DataError, match=r"train.json:3: field 'output' is missing \(data.format=alpaca\)"):
        load_world(tmp_path / "w", SPLITS, "test", DataSource("alpaca"))
    (d / "train.json").write_text(
        json.dumps([{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}])
    )
    with pytest.raises(DataError, match=r"train.json:1: field 'messages' must hold one user turn then one assistant"):
        load_world(tmp_path / "w", SPLITS, "test", DataSource("messages"))
    (d / "train.json").write_text('[{"question": "q", "answer": "a"}, 3]')
    with pytest.raises(DataError, match=r"train.json:1: element 2 is not a JSON object"):
        load_world(tmp_path / "w", SPLITS, "test")


def check(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), *args, "--check"],
        cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return proc, time.time() - t0


@pytest.mark.e2e
def test_check_accepts_alpaca_arrays_without_stage_0(tiny_world, tiny_base, tmp_path):
    write_as(tiny_world, tmp_path / "alpaca", "alpaca")
    proc, seconds = check(
        str(REPO / "ds_configs" / "run_cpu_default.yaml"), f"data.dir={tmp_path / 'alpaca'}", "data.format=alpaca",
        f"model.path={tiny_base}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check passed" in proc.stdout and "no stage 0" in proc.stdout and seconds < 30
    # the same data read as plain rows is refused, naming the file, the line and the field
    proc, seconds = check(str(TINY_CONFIG), f"data.dir={tmp_path / 'alpaca'}", f"model.path={tiny_base}")
    assert proc.returncode == 2 and seconds < 15
    assert "stage_01/train.json:2: field 'question' is missing" in proc.stderr, proc.stderr
