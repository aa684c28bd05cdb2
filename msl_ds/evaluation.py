"""The authors' evaluation protocol and the continual-learning metrics (docs/METHOD.md).

An answer is correct iff it states the gold answer as whole words (``msl_ds.answers``: case,
accents, punctuation and thousands separators ignored, so a gold "1" is not credited inside
"10"); ``eval.match: substring`` restores the authors' rule (the lower-cased gold is a substring
of the lower-cased answer, their ``evaluation.py``). The gold is the one *current* at the
stage being evaluated (``msl_ds.facts``): a fact updated after the stage that introduced it is
right only with its newer value. On top of per-question results: ``acc_world`` (every current
fact once), old/new accuracy and knowledge gain/retention rates (KGR/KRR) between the model
before and after a stage, the accuracy matrix R[i][j] with ACC and BWT, and the share of
answers still giving a superseded value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from msl_ds import answers
from msl_ds.facts import WorldState, fact_key
from msl_ds.generation import GenConfig, generate


def is_correct(output: str, gold: str, rule: str = "word") -> bool:
    """Whether ``output`` states ``gold`` (:func:`msl_ds.answers.states` under ``rule``)."""
    return answers.states(output, gold, rule)


def score_row(row: dict[str, Any], output: str, state: WorldState | None = None, rule: str = "word") -> dict[str, Any]:
    """The verdicts on one answer: scored against the gold current in ``state``.

    ``gold`` is the current gold (``stated_gold`` the row's own when it differs); ``correct``
    is :func:`is_correct` (``rule``: ``eval.match``) on the current gold; ``outdated``: the answer holds a value
    the fact had before and not the current one.
    """
    gold = state.current(row) if state is not None else row["answer"]
    old = state.old_values(row) if state is not None else [v for v in [row.get("previous_answer")] if v]
    correct = is_correct(output, gold, rule)
    r = {"fact": fact_key(row), "gold": gold, "correct": correct}
    if gold != row["answer"]:
        r["stated_gold"] = row["answer"]
    r["outdated"] = (not correct) and any(is_correct(output, v, rule) for v in old)
    if old:
        r["superseded"] = list(old)
    return r


STALE = ("fact", "gold", "stated_gold", "correct", "outdated", "superseded")


def rescore(
    records: list[dict[str, Any]], rows: dict[str, dict[str, Any]], state: WorldState, rule: str = "word"
) -> list[dict[str, Any]]:
    """Score stored answers (``eval.jsonl`` records) again against ``state``.

    ``rows`` maps each record's ``id`` to its data row; the verdicts are recomputed by the same
    rule as at evaluation time, so a run's metrics can be recomputed from its outputs and the
    world files alone.
    """
    out = []
    for rec in records:
        if rec["id"] not in rows:
            raise KeyError(f"evaluation record {rec['id']!r} has no row in the data")
        r = {k: v for k, v in rec.items() if k not in STALE}
        r.update(score_row(rows[rec["id"]], rec["output"], state, rule))
        out.append(r)
    return out


def score(
    rows: list[dict[str, Any]], outputs: list[dict[str, Any]], state: WorldState | None = None, rule: str = "word"
):
    """Per-question results: the row's id, question, the output and its verdicts (:func:`score_row`)."""
    out = []
    for row, gen in zip(rows, outputs, strict=True):
        r = {"id": row["id"], "question": row["question"], "output": gen["text"], "finished": gen["finished"]}
        r.update(score_row(row, gen["text"], state, rule))
        if row.get("previous_answer"):
            r["previous_answer"] = row["previous_answer"]
        out.append(r)
    return out


def evaluate_sets(
    model,
    tokenizer,
    pad_id,
    sets: dict[str, list[dict[str, Any]]],
    cfg: GenConfig,
    desc: str,
    states: dict[str, WorldState] | None = None,
    rule: str = "word",
) -> dict[str, list[dict[str, Any]]]:
    """Generate once over the union of ``sets`` and score each set against its world state
    (``states[name]``; a set without one is scored against its rows' own answers)."""
    names = list(sets)
    questions = [r["question"] for n in names for r in sets[n]]
    outputs = generate(model, tokenizer, pad_id, questions, cfg, desc=desc)
    results, k = {}, 0
    for n in names:
        results[n] = score(sets[n], outputs[k : k + len(sets[n])], (states or {}).get(n), rule)
        k += len(sets[n])
    return results


def accuracy(results: list[dict[str, Any]]) -> float:
    return sum(r["correct"] for r in results) / len(results) if results else float("nan")


def outdated_share(results: list[dict[str, Any]]) -> float:
    """Among questions whose fact had an earlier value, the share answered with one of those."""
    changed = [r for r in results if r.get("superseded")]
    return sum(r["outdated"] for r in changed) / len(changed) if changed else float("nan")


def _per_fact(rows: list[dict[str, Any]], flag: str) -> dict[str, float]:
    """Mean of ``flag`` over each fact's rows (its phrasings), keyed by fact."""
    by: dict[str, list[bool]] = {}
    for r in rows:
        by.setdefault(r["fact"], []).append(bool(r[flag]))
    return {k: sum(v) / len(v) for k, v in by.items()}


def world_metrics(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """``acc_world``: accuracy over every fact of the stage sets in ``results``, each fact weighted
    once (the mean over its phrasings), against the current gold; ``outdated_world``: over the
    facts that changed so far, the share answered with a superseded value (same weighting)."""
    rows = [r for n, rs in results.items() if n.startswith("stage_") for r in rs]
    acc = _per_fact(rows, "correct")
    changed = {r["fact"] for r in rows if r.get("superseded")}
    old = _per_fact([r for r in rows if r["fact"] in changed], "outdated")
    nan = float("nan")
    return {
        "acc_world": sum(acc.values()) / len(acc) if acc else nan,
        "acc_world_facts": len(acc),
        "outdated_world": sum(old.values()) / len(old) if old else nan,
        "outdated_world_facts": len(old),
    }


def transfer(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, Any]:
    """old_acc, new_acc, KGR and KRR on the same questions before and after training (the
    authors' ``evaluation.py``), with the denominators of KGR (wrong before) and KRR (right before)."""
    by_id = {r["id"]: r["correct"] for r in before}
    pairs = [(by_id[r["id"]], r["correct"]) for r in after]
    wrong = [a for b, a in pairs if not b]
    right = [a for b, a in pairs if b]
    nan = float("nan")
    return {
        "old_acc": sum(b for b, _ in pairs) / len(pairs) if pairs else nan,
        "new_acc": sum(a for _, a in pairs) / len(pairs) if pairs else nan,
        "kgr": sum(wrong) / len(wrong) if wrong else nan,
        "kgr_n": len(wrong),
        "krr": sum(right) / len(right) if right else nan,
        "krr_n": len(right),
    }


def acc_bwt(matrix: dict[int, dict[int, float]]) -> dict[str, float]:
    """ACC = mean_j R[T][j]; BWT = mean_{j<T} (R[T][j] - R[j][j]) over the stages in ``matrix``."""
    T = max(matrix)
    last = matrix[T]
    acc = sum(last.values()) / len(last)
    earlier = [j for j in last if j < T and j in matrix and j in matrix[j]]
    bwt = sum(last[j] - matrix[j][j] for j in earlier) / len(earlier) if earlier else float("nan")
    return {"acc": acc, "bwt": bwt}


def stage_scores(
    t: int, before: list[dict[str, Any]], results: dict[str, list[dict[str, Any]]], prev_matrix: dict[str, Any]
) -> dict[str, Any]:
    """Every scored metric of stage ``t`` from its pre-evaluation and evaluation records.

    ``before``: π_{t-1}'s records (``set`` "now" = stage t's questions; on the first stage also
    the base model's sets); ``results``: π_t's records per set; ``prev_matrix``: the accuracy
    matrix rows of earlier stages. Used by the recipe and by re-scoring alike.
    """
    matrix = {i: dict(row) for i, row in prev_matrix.items()}
    base: dict[str, Any] = {}
    if not matrix:  # row 0: the base model, from the first stage's pre-evaluation
        sets: dict[str, list[dict[str, Any]]] = {}
        for r in before:
            if r["set"] != "now":
                sets.setdefault(r["set"], []).append(r)
        now = [r for r in before if r["set"] == "now"]
        if not any(n.startswith("stage_") for n in sets):  # no stage 0: the base model knows stage t's facts?
            sets[f"stage_{t:02d}"] = now
        base = {n: accuracy(rs) for n, rs in sets.items()}
        base.update({k: v for k, v in world_metrics(sets).items() if not k.endswith("_facts")})
        first = min(int(n.split("_")[1]) for n in sets if n.startswith("stage_"))
        matrix["0"] = {str(first): base[f"stage_{first:02d}"]}
    matrix[str(t)] = {str(int(n.split("_")[1])): accuracy(rs) for n, rs in results.items() if n.startswith("stage_")}
    numeric = {int(i): {int(j): v for j, v in r.items()} for i, r in matrix.items()}
    now = [r for r in before if r["set"] == "now"]
    mine = results[f"stage_{t:02d}"]
    return {
        "stage": t,
        **({"base": base} if base else {}),
        **transfer(now, mine),
        **acc_bwt(numeric),
        **world_metrics(results),
        "retain": accuracy(results["retain"]) if "retain" in results else float("nan"),
        "general": accuracy(results["general"]) if "general" in results else float("nan"),
        "outdated": outdated_share(mine),
        "matrix": matrix,
    }


def json_safe(obj: Any) -> Any:
    """NaN (an empty denominator) becomes ``null``: JSON has no NaN."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "—" if v != v else f"{v:.3f}"
    return str(v)


def markdown_table(stages: list[dict[str, Any]]) -> str:
    """One row per stage from the stage metrics dicts, then the final accuracy matrix."""
    cols = [
        "stage", "acc_world", "outdated_world", "old_acc", "new_acc", "kgr", "krr", "acc", "bwt", "retain", "general",
        "outdated", "train_steps",
    ]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for m in stages:
        lines.append("| " + " | ".join(_fmt(m.get(c, float("nan"))) for c in cols) + " |")
    matrix = stages[-1].get("matrix", {}) if stages else {}
    if matrix:
        js = sorted({int(j) for row in matrix.values() for j in row})
        lines += ["", "Accuracy matrix R[i][j] (row: after stage i; column: stage j's facts, current golds)", ""]
        lines.append("| i \\ j | " + " | ".join(str(j) for j in js) + " |")
        lines.append("|---|" + "---|" * len(js))
        for i in sorted(matrix, key=int):
            row = matrix[i]
            lines.append(f"| {i} | " + " | ".join(_fmt(row.get(str(j), row.get(j, float("nan")))) for j in js) + " |")
    return "\n".join(lines) + "\n"


def base_vs_final(stages: list[dict[str, Any]]) -> str:
    """One line per probe set: the base model's accuracy (the first stage's pre-evaluation) and the
    last stage's, e.g. ``retain: base 0.933 -> final 0.867``; empty when no base was measured."""
    base = stages[0].get("base", {}) if stages else {}
    lines = []
    for name in ("retain", "general", "acc_world"):
        if name in base:
            lines.append(f"{name}: base {_fmt(base[name])} -> final {_fmt(stages[-1].get(name))}")
    return "\n".join(lines)


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def rescore_run(run_dir: str | Path, world, split: str, rule: str = "word") -> list[dict[str, Any]]:
    """Every stage's metrics of a finished run, recomputed from its stored answers.

    ``world``: the run's data (``msl_ds.data.load_world`` with ``("train", split)``). Each
    stage's ``pre_eval.jsonl`` and ``eval.jsonl`` answers are scored again against the world
    state of that stage and summarised by :func:`stage_scores`; every other field of the
    stage's ``metrics.json`` (probe, augmentation, training statistics) is kept. The scored
    fields equal what the run itself wrote when it ran this code.
    """
    run_dir = Path(run_dir)
    stages = [m["stage"] for m in json.loads((run_dir / "summary.json").read_text())["stages"]]
    state = lambda t: world.state(t, ("train", split), stages)  # noqa: E731
    out, matrix = [], {}
    for t in stages:
        sdir = run_dir / f"stage_{t:02d}"

        def rows(name: str, t: int = t) -> dict[str, dict[str, Any]]:
            if name == "now":
                return {r["id"]: r for r in world.split(t, split)}
            if name.startswith("stage_"):
                return {r["id"]: r for r in world.split(int(name.split("_")[1]), split)}
            return {r["id"]: r for r in getattr(world, name)}

        def scored(path: Path, state_of) -> dict[str, list[dict[str, Any]]]:
            sets: dict[str, list[dict[str, Any]]] = {}
            for rec in _records(path):
                sets.setdefault(rec["set"], []).append(rec)
            return {n: rescore(rs, rows(n), state_of(n), rule) for n, rs in sets.items()}

        before = scored(sdir / "pre_eval.jsonl", lambda n, t=t: state(t) if n == "now" else state(t - 1))
        results = scored(sdir / "eval.jsonl", lambda n, t=t: state(t))
        scores = stage_scores(t, [r for rs in before.values() for r in rs], results, matrix)
        matrix = scores["matrix"]
        kept = json.loads((sdir / "metrics.json").read_text())
        out.append(json_safe({**kept, **scores}))
    return out
