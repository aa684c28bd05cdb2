"""The comparison runner in its tiny mode: real runs of two methods, then the summary."""

from __future__ import annotations

import json
import math
import statistics
import sys

import pytest
from conftest import REPO, run

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

PNG = b"\x89PNG\r\n\x1a\n"


def test_mean_std_over_seeds():
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare", REPO / "launch" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    mean_std = compare.mean_std

    got = mean_std([0.2, 0.4, float("nan"), 0.9])
    assert got["mean"] == pytest.approx(statistics.fmean([0.2, 0.4, 0.9]))
    assert got["std"] == pytest.approx(statistics.stdev([0.2, 0.4, 0.9]))
    assert mean_std([0.5])["std"] == 0.0 and math.isnan(mean_std([float("nan")])["mean"])


def test_compare_tiny_mode(tiny_world, tiny_base, tmp_path):
    out = tmp_path / "cmp"
    cmd = [
        sys.executable, str(REPO / "launch" / "compare.py"), "--data", str(tiny_world), "--model", str(tiny_base),
        "--out", str(out), "--config", str(REPO / "ds_configs" / "run_cpu_tiny.yaml"),
        "--methods", "sft", "msl_no_aug", "--seeds", "0", "--nproc", "1", "--jobs", "2",
        # one short stage; grad_accum 2 on 1 rank keeps the global batch of 2 ranks
        "data.stages=[1]", "data.eval_limit=24", "train.max_steps=4", "train.grad_accum=2",
    ]  # fmt: skip
    proc = run(cmd, timeout=600)
    assert "| sft |" in proc.stdout and "| msl_no_aug |" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"sft", "msl_no_aug"}
    for method, res in summary["methods"].items():
        r = json.loads((out / "runs" / method / "seed0" / "summary.json").read_text())
        assert res["final"]["acc"]["values"] == [r["stages"][-1]["acc"]]
        assert res["per_stage"]["new_acc"][0]["mean"] == r["stages"][0]["new_acc"]
        assert res["matrix"]["1/1"]["mean"] == r["stages"][-1]["matrix"]["1"]["1"]
        assert res["final"]["wall_seconds"]["mean"] > 0
        assert (out / f"matrix_{method}.png").read_bytes()[:8] == PNG
    assert summary["methods"]["msl_no_aug"]["final"]["conflict_recall"]["mean"] >= 0  # msl reports the probe
    assert (out / "curves.png").read_bytes()[:8] == PNG
    md = (out / "summary.md").read_text()
    assert "valid" not in md and "`test` phrasings" in md
    # a second call finds every run done and only rebuilds the summary
    walls = {p: p.read_text() for p in out.glob("runs/*/*/wall.json")}
    run(cmd, timeout=300)
    assert {p: p.read_text() for p in out.glob("runs/*/*/wall.json")} == walls
    # finished runs are keyed by their fingerprint: other settings are refused, naming the key
    proc = run([*cmd, "train.lr=0.002"], timeout=300, check=False)
    assert proc.returncode != 0 and "train.lr" in proc.stderr, proc.stderr[-2000:]
