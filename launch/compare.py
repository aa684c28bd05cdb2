"""Compare methods on one world and base model: sequential SFT, replay, MSL and its ablations.

    python launch/compare.py --out results/paper                       # the embedded default world
    python launch/compare.py --data DIR --model DIR --out results/mine  # any DESIGN.md §4 world
    python launch/compare.py --split valid ...                          # choose hyperparameters here

Every (method, seed) pair is one ordinary ``launch/train.py`` run under ``<out>/runs/`` (so it
resumes like one), launched with ``deepspeed``; ``--jobs`` runs several at once, each with
``--nproc`` ranks. When all are done, ``<out>/summary.md`` and ``<out>/summary.json`` hold mean
± std over seeds per method, and ``<out>/curves.png`` and ``<out>/matrix_<method>.png`` the
plots. Extra ``key=value`` arguments go to every run (e.g. ``data.stages=[1,2]``).

Evaluation uses ``--split`` (``test`` by default). Hyperparameters are chosen with
``--split valid`` (other phrasings of the same facts) and only then measured on ``test``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from msl_ds.config import load_config  # noqa: E402
from msl_ds.fingerprint import FILE as FINGERPRINT  # noqa: E402
from msl_ds.fingerprint import differences, fingerprint  # noqa: E402
from msl_ds.io import read_json, write_json, write_text  # noqa: E402

METHODS: dict[str, list[str]] = {
    "sft": ["run.method=sft"],
    "replay": ["run.method=replay"],
    "msl": ["run.method=msl"],
    "msl_no_pbl": ["run.method=msl", "pbl.enabled=false"],
    "msl_no_aug": ["run.method=msl", "augment.enabled=false"],
    "msl_no_select": ["run.method=msl", "select.enabled=false"],
}
FINAL = ("acc", "bwt", "retain", "general", "outdated")  # after the last stage
MEANS = ("new_acc", "kgr", "krr", "conflict_precision", "conflict_recall")  # mean over stages


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(a: argparse.Namespace, method: str, seed: int, threads: int) -> dict[str, Any]:
    """One ``launch/train.py`` run; skipped when a finished run with its wall time and this run's
    fingerprint (``fingerprint.json``: config keys, data and model checksums) is on disk."""
    out = Path(a.out) / "runs" / method / f"seed{seed}"
    wall = out / "wall.json"
    args = [
        a.config, f"data.dir={a.data}", f"model.path={a.model}", f"run.output_dir={out}", f"run.seed={seed}",
        f"data.eval_split={a.split}", f"run.name={method}-seed{seed}", "monitor.progress=false",
        f"deepspeed.threads_per_rank={threads}", *METHODS[method], *a.overrides,
    ]  # fmt: skip
    if wall.is_file() and (out / "summary.json").is_file() and (out / FINGERPRINT).is_file():
        differs = differences(
            read_json(out / FINGERPRINT)["keys"], fingerprint(load_config(args[0], args[1:]), a.nproc)
        )
        if not differs:
            return read_json(wall)
        raise SystemExit(f"{out}: finished with other settings ({', '.join(differs[:8])}); use another --out")
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(a.nproc), "--master_port",
        str(free_port()), str(ROOT / "launch" / "train.py"), *args,
    ]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(out / "launch.log", "a") as log:
        env = {**os.environ, "MSL_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise SystemExit(f"{method} seed {seed} failed (exit {rc}); see {out / 'launch.log'}")
    info = {"method": method, "seed": seed, "seconds": time.time() - t0, "command": " ".join(cmd)}
    write_json(wall, info)
    print(f"{method} seed {seed}: {info['seconds']:.0f} s", flush=True)
    return info


# --------------------------------------------------------------------------- aggregation


def mean_std(values: list[float]) -> dict[str, Any]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "values": values}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "values": values}


def aggregate(out: Path, methods: list[str], seeds: list[int]) -> dict[str, Any]:
    """Mean ± std over seeds of every reported quantity, per method."""
    result: dict[str, Any] = {}
    for m in methods:
        runs = [read_json(out / "runs" / m / f"seed{s}" / "summary.json")["stages"] for s in seeds]
        walls = [read_json(out / "runs" / m / f"seed{s}" / "wall.json")["seconds"] for s in seeds]
        stages = [st["stage"] for st in runs[0]]
        nan = float("nan")
        final = {k: mean_std([r[-1].get(k, nan) for r in runs]) for k in FINAL}
        final.update({k: mean_std([statistics.fmean([st.get(k, nan) for st in r]) for r in runs]) for k in MEANS})
        final["wall_seconds"] = mean_std(walls)
        # the first stage's changed facts (DESIGN.md: the conflicts): accuracy and old answers given
        changed = [first_stage_changed(out / "runs" / m / f"seed{s}", stages[0]) for s in seeds]
        final["stage1_changed_acc"] = mean_std([c[0] for c in changed])
        final["stage1_changed_outdated"] = mean_std([c[1] for c in changed])
        per_stage = {
            k: [mean_std([r[i].get(k, nan) for r in runs]) for i in range(len(stages))]
            for k in ("acc", "new_acc", "kgr", "krr", "bwt", "retain", "general", "outdated", *MEANS[3:])
        }
        cells = {(i, j) for r in runs for i, row in r[-1]["matrix"].items() for j in row}
        matrix = {
            f"{i}/{j}": mean_std([r[-1]["matrix"].get(i, {}).get(j, nan) for r in runs]) for i, j in sorted(cells)
        }
        result[m] = {"stages": stages, "final": final, "per_stage": per_stage, "matrix": matrix}
    return result


def first_stage_changed(run_dir: Path, stage: int) -> tuple[float, float]:
    """(accuracy, share answered with the previous answer) on the changed facts of ``stage``."""
    rows = [json.loads(x) for x in (run_dir / f"stage_{stage:02d}" / "eval.jsonl").read_text().splitlines()]
    mine = [r for r in rows if r["set"] == f"stage_{stage:02d}" and r.get("previous_answer")]
    if not mine:
        return float("nan"), float("nan")
    return sum(r["correct"] for r in mine) / len(mine), sum(r["outdated"] for r in mine) / len(mine)


def _pm(d: dict[str, Any]) -> str:
    return "—" if math.isnan(d["mean"]) else f"{d['mean']:.3f} ± {d['std']:.3f}"


def summary_markdown(res: dict[str, Any], seeds: list[int], split: str) -> str:
    cols = [*FINAL, *MEANS, "stage1_changed_acc", "stage1_changed_outdated", "wall_seconds"]
    lines = [
        f"Mean ± std over seeds {seeds}, evaluated on the `{split}` phrasings. acc, bwt, retain, general and "
        "outdated after the last stage; new_acc, kgr, krr and conflict precision/recall averaged over stages; "
        "stage1_changed_*: the first stage's changed facts right after it (accuracy, share still answered with "
        "the previous answer); wall_seconds per run.",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for m, r in res.items():
        cells = [_pm(r["final"][c]) if c != "wall_seconds" else f"{r['final'][c]['mean']:.0f}" for c in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    stages = next(iter(res.values()))["stages"]
    for key, title in (("acc", "ACC after each stage"), ("new_acc", "new_acc per stage (the stage's own facts)")):
        lines += ["", f"{title}:", "", "| method | " + " | ".join(str(s) for s in stages) + " |"]
        lines.append("|---|" + "---|" * len(stages))
        for m, r in res.items():
            lines.append(f"| {m} | " + " | ".join(_pm(v) for v in r["per_stage"][key]) + " |")
    return "\n".join(lines) + "\n"


def plots(res: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, r in res.items():
        mean = [v["mean"] for v in r["per_stage"]["acc"]]
        std = [v["std"] for v in r["per_stage"]["acc"]]
        ax.errorbar(r["stages"], mean, yerr=std, marker="o", capsize=3, label=m)
    ax.set_xlabel("after stage")
    ax.set_ylabel("ACC (mean accuracy over stage test sets seen so far)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    written.append("curves.png")
    for m, r in res.items():
        rows = sorted({int(k.split("/")[0]) for k in r["matrix"]})
        cols = sorted({int(k.split("/")[1]) for k in r["matrix"]})
        grid = [[r["matrix"].get(f"{i}/{j}", {"mean": float("nan")})["mean"] for j in cols] for i in rows]
        fig, ax = plt.subplots(figsize=(1 + 0.7 * len(cols), 1 + 0.6 * len(rows)))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for y, row in enumerate(grid):
            for x, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(x, y, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
        ax.set_xticks(range(len(cols)), [str(c) for c in cols])
        ax.set_yticks(range(len(rows)), [str(i) for i in rows])
        ax.set_xlabel("test set of stage j")
        ax.set_ylabel("after stage i")
        ax.set_title(f"{m}: accuracy matrix R[i][j]")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(out / f"matrix_{m}.png", dpi=120)
        plt.close(fig)
        written.append(f"matrix_{m}.png")
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "ds_configs" / "run_cpu_default.yaml"))
    p.add_argument("--data", default=str(ROOT / "data" / "world_default"), help="a DESIGN.md §4 world")
    p.add_argument("--model", default=str(ROOT / "artifacts" / "base_default"), help="its base model")
    p.add_argument("--out", default=str(ROOT / "results" / "compare"))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--split", default="test", choices=["test", "valid"])
    p.add_argument("--nproc", type=int, default=2, help="ranks per run")
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("overrides", nargs="*", help="key=value for every run")
    a = p.parse_args(argv)
    for path, what in ((a.data, "--data"), (a.model, "--model")):
        if not Path(path).is_dir():
            raise SystemExit(f"{what}: {path} is not a directory (make base builds the default world and model)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // (a.jobs * a.nproc))
    t0 = time.time()
    pairs = [(m, s) for s in a.seeds for m in a.methods]
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(lambda ms: run_one(a, ms[0], ms[1], threads), pairs))
    res = aggregate(out, a.methods, a.seeds)
    table = summary_markdown(res, a.seeds, a.split)
    written = plots(res, out)
    meta = {"command": " ".join(sys.argv), "split": a.split, "seeds": a.seeds, "seconds": time.time() - t0}
    write_json(out / "summary.json", {"meta": meta, "methods": res})
    write_text(out / "summary.md", table)
    print(table, flush=True)
    print(f"wrote {out / 'summary.md'}, summary.json, {', '.join(written)}")


if __name__ == "__main__":
    main()
