"""The table of owed GPU numbers that ``benchmarks/gpu_checks.sh`` fills, from the files of one call.

    python benchmarks/gpu_table.py OUT [--dry-run]

Reads ``OUT/env.txt``, ``steps.txt`` and each step's JSON (``loss.json``, ``train.json``,
``gen.json``, ``msl_summary.json``, ``train2.json``, the ``kernels.log`` pytest summary) and prints
one markdown row per number: what it is, its value, the target docs/PERF.md sets for it (if any)
and the step it came from. A number whose step failed, timed out or was skipped is printed as
``-`` with the step's line, so the table always has every row.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

TRAIN_VARIANTS = ("logits", "fused_linear", "logits+ckpt", "fused_linear+ckpt")


def load(out: Path, name: str):
    p = out / name
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def fmt(x, spec: str = ".1f", unit: str = "") -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "-"
    return f"{x:{spec}}{unit}"


def step_lines(out: Path) -> dict[str, str]:
    p = out / "steps.txt"
    lines = p.read_text(encoding="utf-8").splitlines() if p.is_file() else []
    return {m.group(1): ln for ln in lines if (m := re.match(r"== (\S+):", ln))}


def rows(out: Path) -> list[tuple[str, str, str, str]]:
    """``(number, value, target, source)`` for every owed number."""
    steps = step_lines(out)
    src = {name: line.removeprefix("== ") for name, line in steps.items()}

    def source(name: str) -> str:
        return src.get(name, f"{name}: not run")

    out_rows = []
    log = out / "kernels.log"
    summary = (
        [ln for ln in log.read_text(encoding="utf-8").splitlines() if "passed" in ln or "failed" in ln]
        if log.is_file()
        else []
    )
    out_rows.append(
        ("Triton kernel tests (pytest -m gpu)", summary[-1].strip() if summary else "-", "all pass", source("kernels"))
    )

    loss = load(out, "loss.json") or []
    for r in loss:
        name = f"loss kernel {r['contender']}, V={r['V']}, {r['dtype']}: fwd+bwd ms / peak extra MiB"
        value = f"{fmt(r['time_s'] * 1e3, '.1f')} / {fmt(r.get('extra_bytes', float('nan')) / 2**20, '.1f')}"
        out_rows.append((name, value, "", source("loss")))
    if not loss:
        out_rows.append(("loss kernels and library baselines", "-", "", source("loss")))

    train = (load(out, "train.json") or {}).get("results", {})
    for v in TRAIN_VARIANTS:
        r = train.get(f"msl_ds {v}", {})
        out_rows.append((f"train msl_ds {v}: tokens/s", fmt(r.get("tokens_per_s"), ".0f"), "", source("train")))
        out_rows.append(
            (
                f"train msl_ds {v}: MFU",
                fmt(100 * r["mfu"] if "mfu" in r else None, ".1f", "%"),
                ">= 40%",
                source("train"),
            )
        )
        out_rows.append((f"train msl_ds {v}: peak GiB", fmt(r.get("peak_gib"), ".2f"), "", source("train")))
        out_rows.append(
            (f"train msl_ds {v}: largest micro-batch (est.)", fmt(r.get("max_micro"), ".0f"), "", source("train"))
        )
    hf = train.get("transformers.Trainer", {})
    out_rows.append(
        ("train transformers.Trainer (same JSON): tokens/s", fmt(hf.get("tokens_per_s"), ".0f"), "", source("train"))
    )
    out_rows.append(
        (
            "train transformers.Trainer: MFU",
            fmt(100 * hf["mfu"] if "mfu" in hf else None, ".1f", "%"),
            "",
            source("train"),
        )
    )
    out_rows.append(("train transformers.Trainer: peak GiB", fmt(hf.get("peak_gib"), ".2f"), "", source("train")))
    best = train.get("msl_ds fused_linear+ckpt", {})
    ratio = best["tokens_per_s"] / hf["tokens_per_s"] if "tokens_per_s" in best and "tokens_per_s" in hf else None
    out_rows.append(("msl_ds fused_linear+ckpt / Trainer tokens/s", fmt(ratio, ".2f", "x"), ">= 1.2x", source("train")))
    mm = [train.get(f"msl_ds {v}", {}).get("max_micro") for v in ("fused_linear", "logits")]
    ok = all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in mm)
    out_rows.append(
        (
            "largest micro-batch fused_linear / logits",
            fmt(mm[0] / mm[1] if ok else None, ".2f", "x"),
            ">= 2x",
            source("train"),
        )
    )

    gen = load(out, "gen.json") or {}
    modes = gen.get("modes", {})
    for mode in ("gathered", "synced"):
        out_rows.append(
            (
                f"generation (augment phase) {mode}: tokens/s",
                fmt(modes.get(mode, {}).get("tokens_per_s"), ".0f"),
                "",
                source("gen"),
            )
        )
    g, s = modes.get("gathered", {}).get("seconds"), modes.get("synced", {}).get("seconds")
    out_rows.append(
        ("generation gathered speed-up vs synced", fmt(s / g if g and s else None, ".2f", "x"), "", source("gen"))
    )

    msl = (load(out, "msl_summary.json") or {}).get("stages", [])
    for st in msl:
        k = st.get("stage")
        out_rows.append(
            (f"2-stage msl run, stage {k}: stage seconds", fmt(st.get("stage_seconds"), ".1f"), "", source("msl"))
        )
        out_rows.append(
            (
                f"2-stage msl run, stage {k}: train answer tokens/s",
                fmt(st.get("answer_tokens_per_s"), ".0f"),
                "",
                source("msl"),
            )
        )
    if not msl:
        out_rows.append(("2-stage msl run (fused_linear, checkpointing)", "-", "completes", source("msl")))

    two = (load(out, "train2.json") or {}).get("results", {}).get("msl_ds fused_linear+ckpt", {})
    out_rows.append(
        (
            "train on 2 ranks, msl_ds fused_linear+ckpt: tokens/s",
            fmt(two.get("tokens_per_s"), ".0f"),
            "",
            source("train2"),
        )
    )
    out_rows.append(
        (
            "generation-mode and packing tests",
            "-" if "genmode" not in src else src["genmode"].split(": ", 1)[1],
            "pass",
            source("genmode"),
        )
    )
    return out_rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args()
    out = Path(a.out)
    env = (out / "env.txt").read_text(encoding="utf-8").strip().splitlines() if (out / "env.txt").is_file() else []
    print()
    if a.dry_run:
        print("DRY RUN (tiny sizes on a CPU): the table the GPU call fills; these values measure nothing.")
    print("Machine: " + " · ".join(x.strip() for x in env[1:] if x.strip() and not x.startswith("[")))
    print()
    print("| number | value | target | from |")
    print("|---|---|---|---|")
    for number, value, target, source in rows(out):
        print(f"| {number} | {value} | {target} | {source} |")


if __name__ == "__main__":
    main()
