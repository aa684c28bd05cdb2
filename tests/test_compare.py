"""The comparison runner in its tiny mode: real runs of two methods × two seeds, then the summary."""

from __future__ import annotations

import json
import statistics
import sys

import pytest
from conftest import REPO, run

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

PNG = b"\x89PNG\r\n\x1a\n"


def test_compare_tiny_mode(tiny_world, tiny_base, tmp_path):
    out = tmp_path / "cmp"
    cmd = [
        sys.executable, str(REPO / "launch" / "compare.py"), "--data", str(tiny_world), "--model", str(tiny_base),
        "--out", str(out), "--config", str(REPO / "ds_configs" / "run_cpu_tiny.yaml"),
        "--methods", "sft", "msl_no_aug", "--seeds", "0", "1", "--nproc", "1", "--jobs", "2",
        # one short stage; grad_accum 2 on 1 rank keeps the global batch of 2 ranks
        "data.stages=[1]", "data.eval_limit=24", "train.max_steps=4", "train.grad_accum=2",
    ]  # fmt: skip
    proc = run(cmd, timeout=600)
    assert "| sft |" in proc.stdout and "| msl_no_aug |" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"sft", "msl_no_aug"}
    for method, res in summary["methods"].items():
        runs = [json.loads((out / "runs" / method / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)]
        accs = [r["stages"][-1]["acc"] for r in runs]
        assert res["final"]["acc"]["values"] == accs
        assert res["final"]["acc"]["mean"] == pytest.approx(statistics.fmean(accs))
        assert res["final"]["acc"]["std"] == pytest.approx(statistics.stdev(accs))
        assert res["per_stage"]["new_acc"][0]["mean"] == pytest.approx(
            statistics.fmean(r["stages"][0]["new_acc"] for r in runs)
        )
        cell = res["matrix"]["1/1"]["mean"]
        assert cell == pytest.approx(statistics.fmean(r["stages"][-1]["matrix"]["1"]["1"] for r in runs))
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
