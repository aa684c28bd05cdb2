"""The closing report of a protocol's test runs (docs/PROTOCOL.md §7), from the published files only.

    python tools/report.py --results docs/results/default --data data/world_default

Reads ``<results>/summary.json``, every ``<results>/runs/<method>_seed<k>.json`` with its answers
(``.eval.jsonl.gz``) and ``<results>/base_metrics.json`` (the base model's own evaluation), and
writes ``<results>/report.md`` and ``report.json``:

* the test table: mean ± std and every seed's value of the protocol's metrics, per method;
* paired comparisons of final ``acc_world`` (msl − sft, msl − replay, msl_replay − replay, msl −
  msl_no_pbl, msl − msl_paper): each seed's difference and its sign, the exact one-sided sign-test
  p-value over seeds, and a paired bootstrap 95% interval over facts, seeds pooled (a fact's
  difference is its per-phrasing accuracy under A minus under B, averaged over the seeds; facts
  are resampled with replacement, ``--boot`` times, from a fixed ``--boot-seed``);
* every target of §7, met or missed, with the numbers it was decided on.

Per-fact scores come from ``tools/rescore.py`` (independent of msl_ds), so the report needs only
the world's files and the standard library. Nothing here chooses anything: it reads finished runs.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rescore  # noqa: E402  (tools/rescore.py, standard library only)

PAIRS = [("msl", "sft"), ("msl", "replay"), ("msl_replay", "replay"), ("msl", "msl_no_pbl"), ("msl", "msl_paper")]
TABLE = ["acc_world", "outdated_world", "retain", "general", "bwt", "new_acc", "conflict_precision",
         "conflict_recall", "stage1_changed_acc", "stage1_changed_outdated"]  # fmt: skip


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not math.isnan(v)


def stage_metric(record: dict, key: str) -> list[float]:
    """``key`` at every stage of a published run that reports it (NaN and missing skipped)."""
    vals = [st.get(key) for st in record["stages"]]
    return [float(v) for v in vals if isinstance(v, (int, float)) and not math.isnan(v)]


def fact_scores(results: Path, world: Path, method: str, seeds: list[int]) -> list[dict[str, float]]:
    out = []
    for s in seeds:
        _, answers, stages, split, rule = rescore.load_run(results / "runs" / f"{method}_seed{s}.json")
        out.append(rescore.per_fact(world, answers, stages, split, rule))
    return out


def bootstrap(diffs: list[float], reps: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean of ``diffs`` under resampling with replacement."""
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(reps))
    return means[int(0.025 * reps)], means[int(0.975 * reps) - 1]


def sign_test(diffs: list[float]) -> float:
    """Exact one-sided sign-test p-value that A > B (ties dropped): P(X >= wins), X ~ Bin(n, 1/2)."""
    d = [x for x in diffs if x != 0]
    wins = sum(x > 0 for x in d)
    return sum(math.comb(len(d), k) for k in range(wins, len(d) + 1)) / 2 ** len(d) if d else 1.0


def paired(results: Path, world: Path, a: str, b: str, summary: dict, seeds: list[int], reps: int,
           boot_seed: int) -> dict:  # fmt: skip
    sa, sb = summary["methods"][a]["acc_world"]["seeds"], summary["methods"][b]["acc_world"]["seeds"]
    per_seed = [x - y for x, y in zip(sa, sb)]
    fa, fb = fact_scores(results, world, a, seeds), fact_scores(results, world, b, seeds)
    facts = sorted(set.intersection(*(set(f) for f in fa + fb)))
    diffs = [statistics.fmean(fa[i][k] - fb[i][k] for i in range(len(seeds))) for k in facts]
    lo, hi = bootstrap(diffs, reps, boot_seed)
    return {"a": a, "b": b, "per_seed": per_seed, "signs": "".join("+" if d > 0 else "-" if d < 0 else "0"
            for d in per_seed), "sign_test_p": sign_test(per_seed), "mean": statistics.fmean(per_seed),
            "facts": len(facts), "fact_mean": statistics.fmean(diffs), "boot95": [lo, hi]}  # fmt: skip


def targets(summary: dict, runs: dict[str, list[dict]], base: dict) -> list[dict]:
    """docs/PROTOCOL.md §7's targets, each with the numbers it is decided on."""
    m = summary["methods"]
    mean = lambda meth, k: m[meth][k]["mean"]  # noqa: E731
    out = []

    def add(name: str, met: bool, **numbers: float) -> None:
        out.append({"target": name, "met": bool(met), **numbers})

    d = mean("msl", "acc_world") - mean("sft", "acc_world")
    add("msl >= sft + 15 pts acc_world", d >= 0.15, difference=d)
    d = mean("msl_replay", "acc_world") - mean("replay", "acc_world")
    add("msl_replay >= replay + 3 pts acc_world", d >= 0.03, difference=d)
    lower = mean("msl_no_pbl", "outdated_world") - mean("msl", "outdated_world")
    cost, std = mean("msl_no_pbl", "acc_world") - mean("msl", "acc_world"), m["msl"]["acc_world"]["std"]
    add("PBL lowers outdated_world by >= 5 pts at <= 1 std (msl's) of acc_world", lower >= 0.05 and cost <= std,
        outdated_lowered=lower, acc_world_cost=cost, msl_acc_world_std=std)  # fmt: skip
    g, g0 = mean("msl", "general"), base["general_acc"]
    add("msl general >= base - 5 pts", g >= g0 - 0.05, msl_general=g, base_general=g0)
    cover = [v for r in runs["msl"] for v in stage_metric(r, "rehearsal_subject_coverage")]
    add("rehearsal coverage of earlier subjects 1.00 at every stage", bool(cover) and min(cover) == 1.0,
        min_coverage=min(cover) if cover else float("nan"), stages_counted=len(cover))  # fmt: skip
    return out


def markdown(summary: dict, runs: dict[str, list[dict]], pairs: list[dict], tgts: list[dict], base: dict) -> str:
    pm = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f}"  # noqa: E731
    lines = [f"# Test report: world `{summary['world']}`, split `{summary['split']}`", "",
             f"Base model: general {base['general_acc']:.3f}, stage_00 {base['stage_00_acc']:.3f}.", "",
             "| method | " + " | ".join(TABLE) + " | stale rows accepted | min coverage |",
             "|---" * (len(TABLE) + 3) + "|"]  # fmt: skip
    for meth, res in summary["methods"].items():
        stale = sum(sum(stage_metric(r, "aug_stale_accepted")) for r in runs[meth])
        cover = [v for r in runs[meth] for v in stage_metric(r, "rehearsal_subject_coverage")]
        cells = [pm(res[k]) if _num(res.get(k, {}).get("mean")) else "—" for k in TABLE]  # NaN is null in JSON
        lines.append(f"| {meth} | " + " | ".join(cells) + f" | {stale:g} | {min(cover) if cover else '—'} |")
    lines += ["", "Every seed's acc_world:", ""]
    for meth, res in summary["methods"].items():
        lines.append(f"- {meth}: " + ", ".join(f"{v:.3f}" for v in res["acc_world"]["seeds"]))
    lines += ["", "| A − B | per seed | signs | sign test p (one-sided) | mean | facts | bootstrap 95% (facts, seeds pooled) |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in pairs:
        lines.append(f"| {p['a']} − {p['b']} | " + ", ".join(f"{d:+.3f}" for d in p["per_seed"]) +
                     f" | {p['signs']} | {p['sign_test_p']:.3f} | {p['mean']:+.3f} | {p['facts']} | "
                     f"[{p['boot95'][0]:+.3f}, {p['boot95'][1]:+.3f}] |")  # fmt: skip
    lines += ["", "| target | met | numbers |", "|---|---|---|"]
    for t in tgts:
        nums = ", ".join(f"{k} {v:.3f}" for k, v in t.items() if k not in ("target", "met"))
        lines.append(f"| {t['target']} | {'yes' if t['met'] else 'no'} | {nums} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="a published test directory (docs/results/<world>)")
    p.add_argument("--data", required=True, help="the world the runs were made on")
    p.add_argument("--boot", type=int, default=10000, help="bootstrap resamples")
    p.add_argument("--boot-seed", type=int, default=0)
    a = p.parse_args(argv)
    results, world = Path(a.results), Path(a.data)
    summary = json.loads((results / "summary.json").read_text(encoding="utf-8"))
    base = json.loads((results / "base_metrics.json").read_text(encoding="utf-8"))
    seeds = sorted(int(f.name.removesuffix(".json").rsplit("_seed", 1)[1])
                   for f in (results / "runs").glob("sft_seed*.json"))  # fmt: skip
    runs = {m: [json.loads((results / "runs" / f"{m}_seed{s}.json").read_text()) for s in seeds]
            for m in summary["methods"]}  # fmt: skip
    pairs = [paired(results, world, x, y, summary, seeds, a.boot, a.boot_seed) for x, y in PAIRS
             if x in summary["methods"] and y in summary["methods"]]  # fmt: skip
    tgts = targets(summary, runs, base)
    (results / "report.json").write_text(json.dumps({"pairs": pairs, "targets": tgts}, indent=1) + "\n")
    text = markdown(summary, runs, pairs, tgts, base)
    (results / "report.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
