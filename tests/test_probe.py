"""Method msl end to end: probe, augmentation, PBL training, metrics; neither the probe nor the
augmented dataset depends on the rank count.

The session's ``msl_run`` (stages 1-2 of the tiny world under ``deepspeed --num_gpus 2``); then the
same probe and augmentation on one rank (tests/scripts/probe_ranks.py) must reproduce the run's
``probe.jsonl`` and ``augment.jsonl``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import MSL_COMMON, TINY_CONFIG, deepspeed_cmd, run

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]


def test_msl_stage_writes_probe_and_pbl_metrics(msl_run, tiny_world):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from msl_ds.io import marker_ok, read_json, read_jsonl

    sdir = msl_run / "stage_01"
    assert marker_ok(sdir) and {"probe.jsonl", "augment.jsonl"} <= set(read_json(sdir / "DONE.json")["files"])
    # run.keep_stage_checkpoints=false (the default): the optimizer checkpoint went with the marker
    assert not (sdir / "ckpt").exists() and not (msl_run / "stage_02" / "ckpt").exists()
    probed = read_jsonl(sdir / "probe.jsonl")
    assert probed and all("ref_logp" in c for r in probed for c in r["candidates"])
    m = read_json(sdir / "metrics.json")
    for k in ("probe_known", "probe_conflict", "probe_unknown", "probe_aligned", "probe_conflicting"):
        assert k in m, k
    augmented = read_jsonl(sdir / "augment.jsonl")
    accepted = sum(r["accepted"] for r in augmented)
    assert m["probe_known"] + m["probe_conflict"] + m["probe_unknown"] + accepted == m["train_rows"]
    assert m["aug_generated"] == len(augmented) and m["aug_accepted"] == accepted > 0, m
    for r in augmented:  # provenance of every sample
        assert {"kind", "source_id", "prompt", "raw", "question", "answer", "accepted", "reason"} <= set(r), r
        assert (r["reason"] == "ok") == r["accepted"]
    # L_NP aims at the stale answers and never at another fact's current gold (pbl defaults);
    # training widens the gold's lead over what was pushed down
    assert m["probe_conflicting"] > 0 and m["np_pushed"] > 0 and m["np_pushed_gold"] == 0, m
    assert m["np_margin_after"] > m["np_margin_before"], m
    assert m["collateral_facts"] == 0 and m["collateral_before"] is None, m
    precision, coverage = rehearsal_by_hand(tiny_world, augmented)
    assert m["rehearsal_precision"] == pytest.approx(precision, abs=1e-12), (m, precision)
    assert m["rehearsal_coverage"] == pytest.approx(coverage, abs=1e-12) and coverage > 0, (m, coverage)
    acc = EventAccumulator(str(msl_run / "tb" / "msl"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/margin_conflict", "train/loss_np", "probe/conflict_recall", "probe/conflict", "stage/new_acc",
        "augment/accepted", "augment/rehearsal_accepted", "probe/np_pushed", "pbl/np_margin_after",
        "pbl/rehearsal_precision",
    ):  # fmt: skip
        assert tag in tags, (tag, sorted(tags))


def rehearsal_by_hand(world: Path, augmented: list[dict]) -> tuple[float, float]:
    """Stage 1's rehearsal precision and coverage, from the world files and augment.jsonl alone:
    a statement is true when it reads "<relation words> of <subject>: <current gold>."; an earlier
    fact (trained before stage 1, not in it) is covered when some statement is about it."""
    import re

    norm = lambda t: " ".join(re.findall(r"\w+", t.lower()))  # noqa: E731
    gold, about, earlier = {}, {}, set()
    stage1 = {json.loads(x)["fact_id"] for x in (world / "stage_01" / "train.jsonl").read_text().splitlines()}
    for t in (0, 1):
        for line in (world / f"stage_{t:02d}" / "train.jsonl").read_text().splitlines():
            r = json.loads(line)
            gold[r["fact_id"]] = r["answer"]
            about[r["fact_id"]] = norm(f"{r['relation'].replace('_', ' ')} of {r['subject']}:")
            if r["fact_id"] not in stage1:
                earlier.add(r["fact_id"])
    true = {norm(f"{about[k]} {g}") for k, g in gold.items()}
    said = [
        norm(x) for r in augmented if r["kind"] == "rehearsal" and r["accepted"]
        for x in re.split(r"(?<=\.)\s+", r["answer"].strip()) if x.strip()
    ]  # fmt: skip
    covered = {k for k in earlier for x in said if x.startswith(about[k] + " ")}
    return sum(x in true for x in said) / len(said), len(covered) / len(earlier)


def test_probe_finds_the_planted_conflicts(msl_run):
    """The planted conflicts are found: precision and recall >= 0.9 against the previous_answer oracle."""
    from msl_ds.io import read_json

    m = read_json(msl_run / "stage_01" / "metrics.json")
    assert m["probe_oracle_conflicts"] >= 6, m  # the base model holds the stage's previous answers
    assert m["conflict_recall"] >= 0.9 and m["conflict_precision"] >= 0.9, m
    # each detected conflict with an oracle is a true one: errors are only on facts without a
    # previous answer (new entities the tiny model answers confidently and wrongly)
    probed = [json.loads(x) for x in (msl_run / "stage_01" / "probe.jsonl").read_text().splitlines()]
    changed = [r for r in probed if "previous_answer" in r]
    assert all(r["oracle_conflict"] == (r["label"] == "conflict") for r in changed)


def test_probe_same_on_one_and_two_ranks(msl_run, tiny_world, tiny_base, tmp_path):
    from msl_ds.io import read_jsonl

    out = tmp_path / "probe_1rank.json"
    args = [str(out), "1", str(TINY_CONFIG), f"data.dir={tiny_world}", f"model.path={tiny_base}", *MSL_COMMON]
    run(deepspeed_cmd("tests/scripts/probe_ranks.py", *args, nproc=1))
    one = json.loads(out.read_text())["probe"]
    two = read_jsonl(msl_run / "stage_01" / "probe.jsonl")
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert (a["greedy"], a["samples"], a["label"]) == (b["greedy"], b["samples"], b["label"]), a["id"]
        assert [(c["text"], c["role"]) for c in a["candidates"]] == [(c["text"], c["role"]) for c in b["candidates"]]
        refs = [a["ref_logp"]] + [c["ref_logp"] for c in a["candidates"]]
        want = [b["ref_logp"]] + [c["ref_logp"] for c in b["candidates"]]
        assert all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-5) for x, y in zip(refs, want)), (refs, want)
    # the augmented dataset written by rank 0 of the 2-rank run is the one a single rank builds
    assert json.loads(out.read_text())["augment"] == read_jsonl(msl_run / "stage_01" / "augment.jsonl")
