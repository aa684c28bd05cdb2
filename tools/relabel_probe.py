"""Conflict labels of a finished run's probe, recomputed under other labelling settings, against the
``previous_answer`` oracle: what ``pbl.consistency``, ``pbl.consistency_scope`` and
``pbl.subject_check`` would have found on the same greedy answers, samples and descriptions.

    python tools/relabel_probe.py runs/smollm2 --scope fact --no-subject-check

Reads ``<run>/stage_NN/probe.jsonl`` (or a published ``probe.jsonl.gz``; one record per training row: greedy answer, samples, the
subject's description when one was asked for, the oracle) and prints, per stage, the labels and
the conflict precision and recall, as the run would have logged them. Generation is not repeated:
the model's answers are the run's own, so settings can be compared on one probe's worth of answers.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

from msl_ds.probe import consistency_evidence, label_fact


def relabel(records: list[dict], consistency: float, scope: str, subject_check: bool, suffices: bool) -> dict:
    rows = [{"fact_id": r["fact"], "id": r["id"]} for r in records]
    evidence = consistency_evidence(rows, [r["greedy"] for r in records], [r["samples"] for r in records], scope)
    labels = []
    for r, ev in zip(records, evidence):
        described = r.get("described") if subject_check else None
        labels.append(label_fact(r["answer"], r["greedy"], ev, consistency, described, suffices, r["question"])[0])
    truth = [bool(r.get("oracle_conflict")) for r in records]
    pred = [x == "conflict" for x in labels]
    tp = sum(t and p for t, p in zip(truth, pred))
    return {
        "known": labels.count("known"), "conflict": labels.count("conflict"), "unknown": labels.count("unknown"),
        "oracle_conflicts": sum(truth), "precision": tp / sum(pred) if sum(pred) else float("nan"),
        "recall": tp / sum(truth) if sum(truth) else float("nan"),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a run directory (run.output_dir)")
    p.add_argument("--consistency", type=float, default=0.5)
    p.add_argument("--scope", choices=("question", "fact"), default="question")
    p.add_argument("--no-subject-check", action="store_true")
    p.add_argument("--no-description-suffices", action="store_true")
    a = p.parse_args(argv)
    stages = sorted(a.run.glob("stage_*/probe.jsonl")) or sorted(a.run.glob("stage_*/probe.jsonl.gz"))
    if not stages:
        raise SystemExit(f"{a.run}: no stage_*/probe.jsonl (a run with run.method msl writes one per stage)")
    for path in stages:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        records = [json.loads(x) for x in data.decode("utf-8").splitlines() if x.strip()]
        res = relabel(records, a.consistency, a.scope, not a.no_subject_check, not a.no_description_suffices)
        print(json.dumps({"stage": path.parent.name, **res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
