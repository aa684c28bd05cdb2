"""Recompute a published run's final ``acc_world`` from its per-question answers and the world files.

    python tools/rescore.py --data data/world_default docs/results/default/runs/*_seed*.json

For each published run JSON (``msl-compare --publish`` writes ``runs/<method>_seed<k>.json`` and,
next to it, ``runs/<method>_seed<k>.eval.jsonl.gz``: the last stage's per-question answers), this
script scores every answer again, independently of msl_ds's own scoring code, and compares the
result with the ``acc_world`` the JSON states for the last stage:

* the gold of a fact is its answer in the latest stage (stage 0 and the run's stages, up to the
  last) whose ``train`` or evaluation-split rows state it (fact: ``fact_id``, else subject +
  relation, else the row id);
* an answer is right under the run's ``eval.match``: ``word`` (the default) when the gold's words
  occur in the output as an adjacent run of whole words, both lower-cased, accents and thousands
  separators dropped, split on non-word characters; ``substring`` when the lower-cased gold is a
  substring of the lower-cased output (the authors' rule);
* ``acc_world`` = the mean over every fact asked in the stage sets of the mean over its phrasings.

Prints one JSON line per run; exits 1 when a recomputed value differs from the published one by
more than ``--tol``. Standard library only, so it runs without msl_ds installed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import unicodedata
from pathlib import Path


def words(text: str) -> list[str]:
    """Lower-cased words, accents stripped, digit groups joined ("1,000" -> "1000")."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    text = re.sub(r"(?<=\d)[,\u2009\u202f](?=\d{3}(?!\d))", "", text)
    text = re.sub(
        r"(?<=\d)[,\u2009\u202f](?=\d{3}(?!\d))", "", text
    )  # a second pass, as msl_ds repeats until none is left
    return re.findall(r"\w+", text.lower())


def right(output: str, gold: str, rule: str) -> bool:
    if rule == "substring":
        return bool(gold.strip()) and gold.strip().lower() in output.lower()
    g, o = words(gold), words(output)
    return bool(g) and any(o[i : i + len(g)] == g for i in range(len(o) - len(g) + 1))


def fact_key(row: dict) -> str:
    if row.get("fact_id"):
        return str(row["fact_id"])
    if row.get("subject") and row.get("relation"):
        return f"{row['subject']} :: {row['relation']}"
    return f"row {row['id']}"


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def golds(world: Path, stages: list[int], split: str) -> dict[str, str]:
    """Each fact's gold after the last of ``stages`` (stage 0 always counts)."""
    gold: dict[str, str] = {}
    for t in sorted({0, *stages}):
        for name in ("train", split):
            for row in read_rows(world / f"stage_{t:02d}" / f"{name}.jsonl"):
                gold[fact_key(row)] = row["answer"]
    return gold


def acc_world(world: Path, answers: list[dict], stages: list[int], split: str, rule: str = "word") -> tuple[float, int]:
    """(acc_world, number of facts) of the stage sets in ``answers``."""
    means = list(per_fact(world, answers, stages, split, rule).values())
    return (sum(means) / len(means) if means else float("nan")), len(means)


def per_fact(world: Path, answers: list[dict], stages: list[int], split: str, rule: str = "word") -> dict[str, float]:
    """Each fact of the stage sets in ``answers``: the share of its phrasings answered right."""
    gold = golds(world, stages, split)
    rows: dict[str, dict] = {}
    right_by_fact: dict[str, list[bool]] = {}
    for rec in answers:
        if not rec["set"].startswith("stage_"):
            continue
        t = int(rec["set"].split("_")[1])
        if t not in rows:
            rows[t] = {r["id"]: r for r in read_rows(world / f"stage_{t:02d}" / f"{split}.jsonl")}
        if rec["id"] not in rows[t]:
            raise SystemExit(f"{rec['id']}: no such row in {world / f'stage_{t:02d}' / f'{split}.jsonl'}")
        key = fact_key(rows[t][rec["id"]])
        right_by_fact.setdefault(key, []).append(right(rec["output"], gold[key], rule))
    return {key: sum(v) / len(v) for key, v in right_by_fact.items()}


def load_run(run_json: Path, split: str | None = None) -> tuple[dict, list[dict], list[int], str, str]:
    """A published run: (its record, its last stage's answers, its stages, split, match rule)."""
    record = json.loads(run_json.read_text(encoding="utf-8"))
    answers_file = run_json.with_name(run_json.name.removesuffix(".json") + ".eval.jsonl.gz")
    if not answers_file.is_file():
        raise SystemExit(f"{run_json}: no per-question answers next to it ({answers_file.name})")
    answers = [json.loads(x) for x in gzip.decompress(answers_file.read_bytes()).decode("utf-8").splitlines() if x]
    eff = record.get("effective_config") or {}
    split = split or eff.get("data", {}).get("eval_split") or "test"
    stages = [s["stage"] for s in record["stages"]]
    return record, answers, stages, split, eff.get("eval", {}).get("match", "word")


def rescore(run_json: Path, world: Path, split: str | None) -> dict:
    record, answers, stages, split, rule = load_run(run_json, split)
    value, facts = acc_world(world, answers, stages, split, rule)
    return {"run": str(run_json), "split": split, "acc_world": value, "facts": facts,
            "published": record["stages"][-1].get("acc_world")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="published run JSONs (runs/<method>_seed<k>.json)")
    p.add_argument("--data", required=True, help="the world the runs were made on")
    p.add_argument("--split", default=None, help="evaluation split (default: the run's data.eval_split, else test)")
    p.add_argument("--tol", type=float, default=1e-9)
    a = p.parse_args(argv)
    bad = 0
    for path in a.runs:
        res = rescore(Path(path), Path(a.data), a.split)
        print(json.dumps(res), flush=True)
        if res["published"] is None or abs(res["acc_world"] - res["published"]) > a.tol:
            print(f"{path}: acc_world {res['acc_world']!r} differs from the published {res['published']!r}",
                  file=sys.stderr)  # fmt: skip
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
