"""The authors' evaluation protocol and the continual-learning metrics (DESIGN.md §2.5).

An answer is correct iff the lower-cased gold answer is a substring of the lower-cased
generated answer (the authors' ``evaluation.py``). On top of per-question results: old/new
accuracy, knowledge gain/retention rates (KGR/KRR) between the model before and after a stage,
the accuracy matrix R[i][j] with ACC and BWT, and the share of answers still giving an
outdated value.
"""

from __future__ import annotations

from typing import Any

from msl_ds.generation import GenConfig, generate


def is_correct(output: str, gold: str) -> bool:
    return gold.strip().lower() in output.lower()


def score(rows: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-question results: the row's id, question, gold, the output and its verdicts."""
    out = []
    for row, gen in zip(rows, outputs, strict=True):
        r = {
            "id": row["id"],
            "question": row["question"],
            "gold": row["answer"],
            "output": gen["text"],
            "finished": gen["finished"],
            "correct": is_correct(gen["text"], row["answer"]),
        }
        if row.get("previous_answer"):
            r["previous_answer"] = row["previous_answer"]
            r["outdated"] = (not r["correct"]) and is_correct(gen["text"], row["previous_answer"])
        out.append(r)
    return out


def evaluate_sets(
    model, tokenizer, pad_id, sets: dict[str, list[dict[str, Any]]], cfg: GenConfig, desc: str
) -> dict[str, list[dict[str, Any]]]:
    """Generate once over the union of ``sets`` and score each set separately."""
    names = list(sets)
    questions = [r["question"] for n in names for r in sets[n]]
    outputs = generate(model, tokenizer, pad_id, questions, cfg, desc=desc)
    results, k = {}, 0
    for n in names:
        results[n] = score(sets[n], outputs[k : k + len(sets[n])])
        k += len(sets[n])
    return results


def accuracy(results: list[dict[str, Any]]) -> float:
    return sum(r["correct"] for r in results) / len(results) if results else float("nan")


def outdated_share(results: list[dict[str, Any]]) -> float:
    """Among questions whose fact changed, the share answered with the previous value."""
    changed = [r for r in results if "previous_answer" in r]
    return sum(r["outdated"] for r in changed) / len(changed) if changed else float("nan")


def transfer(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, float]:
    """old_acc, new_acc, KGR and KRR on the same questions before and after training."""
    by_id = {r["id"]: r["correct"] for r in before}
    pairs = [(by_id[r["id"]], r["correct"]) for r in after]
    wrong = [a for b, a in pairs if not b]
    right = [a for b, a in pairs if b]
    nan = float("nan")
    return {
        "old_acc": sum(b for b, _ in pairs) / len(pairs) if pairs else nan,
        "new_acc": sum(a for _, a in pairs) / len(pairs) if pairs else nan,
        "kgr": sum(wrong) / len(wrong) if wrong else nan,
        "krr": sum(right) / len(right) if right else nan,
    }


def acc_bwt(matrix: dict[int, dict[int, float]]) -> dict[str, float]:
    """ACC = mean_j R[T][j]; BWT = mean_{j<T} (R[T][j] - R[j][j]) over the stages in ``matrix``."""
    T = max(matrix)
    last = matrix[T]
    acc = sum(last.values()) / len(last)
    earlier = [j for j in last if j < T and j in matrix and j in matrix[j]]
    bwt = sum(last[j] - matrix[j][j] for j in earlier) / len(earlier) if earlier else float("nan")
    return {"acc": acc, "bwt": bwt}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "—" if v != v else f"{v:.3f}"
    return str(v)


def markdown_table(stages: list[dict[str, Any]]) -> str:
    """One row per stage from the stage metrics dicts, then the final accuracy matrix."""
    cols = ["stage", "old_acc", "new_acc", "kgr", "krr", "acc", "bwt", "retain", "general", "outdated", "train_steps"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for m in stages:
        lines.append("| " + " | ".join(_fmt(m.get(c, float("nan"))) for c in cols) + " |")
    matrix = stages[-1].get("matrix", {}) if stages else {}
    if matrix:
        js = sorted({int(j) for row in matrix.values() for j in row})
        lines += ["", "Accuracy matrix R[i][j] (row: after stage i, column: stage j test set)", ""]
        lines.append("| i \\ j | " + " | ".join(str(j) for j in js) + " |")
        lines.append("|---|" + "---|" * len(js))
        for i in sorted(matrix, key=int):
            row = matrix[i]
            lines.append(f"| {i} | " + " | ".join(_fmt(row.get(str(j), row.get(j, float("nan")))) for j in js) + " |")
    return "\n".join(lines) + "\n"
