"""Fault matrix: a rank SIGKILLed in every phase of a method-msl stage, then the same command again.

The kills are chained on one output directory that starts with the reference's finished stage 1:
each re-run resumes stage 2 from what the previous kill left and runs into the next kill point;
the last re-run completes. Every kill must leave the
run resumable, nothing half-written may be trusted, and the final metrics must equal those of
the uninterrupted run (``msl_run``, same seed and config).
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import assert_same_metrics, deepspeed_cmd, msl_args, run, stable

pytestmark = [pytest.mark.e2e, pytest.mark.distributed, pytest.mark.slow]

# (MSL_FAULT, what must (not) be on disk for stage 2 after the kill)
KILLS = [
    ("probe:stage=2:rank=0", {"probe.jsonl": False}),  # rank 0 dies before it writes
    ("augment:stage=2:rank=0", {"probe.jsonl": True, "augment.jsonl": False}),
    ("train:stage=2:step=3:rank=1", {"augment.jsonl": True, "pointer": 2}),
    ("checkpoint:stage=2:step=4:rank=0", {"pointer": 2}),  # shards written, pointer not yet moved
    ("export:rank=0", {"pointer": "end", "hf": False}),  # export complete under its temporary name
    ("eval:stage=2:rank=0", {"hf": True, "metrics.json": False}),
    ("stage_end:stage=2:rank=0", {"metrics.json": True}),  # metrics written, marker not
]


def test_every_kill_point_resumes_to_the_uninterrupted_metrics(msl_run, tiny_world, tiny_base, tmp_path):
    out = tmp_path / "faults"
    out.mkdir()
    shutil.copytree(msl_run / "stage_01", out / "stage_01")  # stage 1 finished (marker + checksums)
    shutil.copy(msl_run / "fingerprint.json", out)  # the same settings: the finished stage is trusted
    cmd = deepspeed_cmd("launch/train.py", *msl_args(tiny_world, tiny_base, out))
    plan_steps = json.loads((msl_run / "stage_02" / "metrics.json").read_text())["train_steps"]
    survived = []
    for fault, expect in KILLS:
        proc = run(cmd, env={"MSL_FAULT": fault}, check=False)
        assert proc.returncode != 0, f"{fault}: the kill point was never reached"
        s2 = out / "stage_02"
        assert (out / "stage_01" / "DONE.json").is_file() and not (s2 / "DONE.json").exists(), fault
        for name, present in expect.items():
            if name == "pointer":
                step = json.loads((s2 / "ckpt" / "LATEST.json").read_text())["step"]
                assert step == (plan_steps if present == "end" else present), (fault, step)
            else:
                assert (s2 / name).exists() == present, (fault, name)
        if fault.startswith("export"):  # killed between writing the export and renaming it into place
            assert list(s2.glob(".hf.tmp-*")), "the export kill point is after the rename"
        for f in s2.glob("*.jsonl"):  # whatever exists is complete JSON lines
            [json.loads(line) for line in f.read_text().splitlines()]
        survived.append(fault)
    stage1 = (out / "stage_01" / "metrics.json").read_text()
    run(cmd)
    assert (out / "stage_01" / "metrics.json").read_text() == stage1  # the finished stage was skipped
    assert_same_metrics(stable(msl_run), stable(out), 2)
    assert not list((out / "stage_02").glob(".hf.tmp-*"))  # the killed export's leftovers are gone
    assert not (out / "stage_02" / "ckpt").exists()  # resumed to the end: the checkpoint went with the marker
    for name in ("probe.jsonl", "augment.jsonl"):
        assert (out / "stage_02" / name).read_text() == (msl_run / "stage_02" / name).read_text()
    assert len(survived) == len(KILLS) == 7
