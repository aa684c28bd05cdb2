"""The comparison runner in its tiny mode: real runs of two methods, then the summary."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
from pathlib import Path

import pytest
from conftest import REPO, run

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

PNG = b"\x89PNG\r\n\x1a\n"


def test_mean_std_over_seeds():
    from msl_ds.compare import mean_std

    got = mean_std([0.2, 0.4, float("nan"), 0.9])
    assert got["mean"] == pytest.approx(statistics.fmean([0.2, 0.4, 0.9]))
    assert got["std"] == pytest.approx(statistics.stdev([0.2, 0.4, 0.9]))
    assert mean_std([0.5])["std"] == 0.0 and math.isnan(mean_std([float("nan")])["mean"])
    assert mean_std([0.5, None])["seeds"] == [0.5, None] and mean_std([0.5, None])["mean"] == 0.5


def test_compare_tiny_mode(tiny_world, tiny_base, tmp_path):
    # valid phrasings only: every test file of this copy of the world is garbage, so a run that
    # opened one would fail
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    for p in [*world.glob("stage_*/test.jsonl"), world / "retain.jsonl", world / "general.jsonl"]:
        p.write_text("not JSON: a valid-split run must not read this\n")
    out = tmp_path / "cmp"
    cmd = [
        sys.executable, str(REPO / "launch" / "compare.py"), "--data", str(world), "--model", str(tiny_base),
        "--out", str(out), "--config", str(REPO / "ds_configs" / "run_cpu_tiny.yaml"), "--split", "valid",
        "--methods", "sft", "msl_no_aug", "--seeds", "0", "--nproc", "1", "--jobs", "2", "--world", "tiny",
        "--publish", str(tmp_path / "published"),
        # one short stage; grad_accum 2 on 1 rank keeps the global batch of 2 ranks
        "data.stages=[1]", "data.eval_limit=24", "train.max_steps=4", "train.grad_accum=2",
    ]  # fmt: skip
    proc = run(cmd, timeout=600)
    assert "| sft |" in proc.stdout and "| msl_no_aug |" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world"] == "tiny" and summary["split"] == "valid"
    assert set(summary["methods"]) == {"sft", "msl_no_aug"}
    for method, res in summary["methods"].items():
        run_dir = out / "runs" / method / "seed0"
        inputs = json.loads((run_dir / "inputs.json").read_text())
        assert inputs["eval_split"] == "valid" and not [f for f in inputs["files"] if "test" in Path(f).name]
        assert "retain_valid.jsonl" in " ".join(inputs["files"])
        r = json.loads((run_dir / "summary.json").read_text())
        assert res["acc_world"]["seeds"] == [r["stages"][-1]["acc_world"]]  # re-scoring = what the run wrote
        assert res["acc"]["seeds"] == [r["stages"][-1]["acc"]] and res["retain"]["seeds"] == [r["stages"][-1]["retain"]]
        assert res["per_stage"]["new_acc"][0]["mean"] == r["stages"][0]["new_acc"]
        assert res["matrix"]["1/1"]["mean"] == r["stages"][-1]["matrix"]["1"]["1"]
        assert res["wall_seconds"]["mean"] > 0
        assert res["overrides"]["data.stages"] == "[1]" and res["overrides"]["run.method"] in ("sft", "msl")
        assert (out / f"matrix_{method}.png").read_bytes()[:8] == PNG
        published = json.loads((tmp_path / "published" / "runs" / f"{method}_seed0.json").read_text())
        assert published["stages"][-1]["acc_world"] == r["stages"][-1]["acc_world"] and published["seed"] == 0
    # msl reports the probe: its conflict recall, recomputed from probe.jsonl against the oracle
    # (a changed fact whose greedy answer still gives the previous answer)
    probed = [json.loads(x) for x in (out / "runs/msl_no_aug/seed0/stage_01/probe.jsonl").read_text().splitlines()]
    truth = [bool(r.get("previous_answer")) and r["previous_answer"].lower() in r["greedy"].lower() for r in probed]
    found = sum(t and r["label"] == "conflict" for t, r in zip(truth, probed))
    assert sum(truth) > 0
    assert summary["methods"]["msl_no_aug"]["conflict_recall"]["mean"] == pytest.approx(found / sum(truth), abs=1e-12)
    # every published run records its effective config and commit, and its answers reproduce acc_world
    for method in ("sft", "msl_no_aug"):
        pub = tmp_path / "published" / "runs" / f"{method}_seed0.json"
        rec = json.loads(pub.read_text())
        eff = rec["effective_config"]
        assert eff["data"]["stages"] == [1] and eff["train"]["max_steps"] == 4 and eff["data"]["eval_split"] == "valid"
        assert eff["run"]["method"] == ("sft" if method == "sft" else "msl") and eff["augment"]["enabled"] == (
            method != "msl_no_aug"
        )
        assert rec["commit"]["commit"] == summary["methods"][method]["commit"]["commit"]
        tool = run([sys.executable, str(REPO / "tools" / "rescore.py"), "--data", str(world), str(pub)], timeout=120)
        assert json.loads(tool.stdout.splitlines()[-1])["acc_world"] == pytest.approx(rec["stages"][-1]["acc_world"])
    assert (out / "curves.png").read_bytes()[:8] == PNG
    assert (tmp_path / "published" / "summary.json").read_text() == (out / "summary.json").read_text()
    md = (out / "summary.md").read_text()
    assert "`valid` phrasings" in md and "acc_world" in md
    # a second call finds every run done and only rebuilds the summary
    walls = {p: p.read_text() for p in out.glob("runs/*/*/wall.json")}
    run(cmd, timeout=300)
    assert {p: p.read_text() for p in out.glob("runs/*/*/wall.json")} == walls
    # finished runs are keyed by their fingerprint: other settings are refused, naming the key
    proc = run([*cmd, "train.lr=0.002"], timeout=300, check=False)
    assert proc.returncode != 0 and "train.lr" in proc.stderr, proc.stderr[-2000:]
