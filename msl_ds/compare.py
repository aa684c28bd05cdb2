"""Compare methods on one world and base model: sequential SFT, replay, MSL and its ablations.

    msl-compare --out results/default                        # the embedded default world
    msl-compare --data DIR --model DIR --out results/mine     # any world in the README's layout
    msl-compare --split valid ...                             # choose hyperparameters here
    msl-compare ... --publish docs/results/default            # copy the auditable record

Every (method, seed) pair is one ordinary ``msl-train`` run under ``<out>/runs/`` (so it
resumes like one), launched with ``deepspeed``; ``--jobs`` runs several at once, each with
``--nproc`` ranks. When all are done, every run is re-scored from its stored answers and the
world files (``msl_ds.evaluation.rescore_run``: the current-world rule, whatever code wrote the
run) into ``<out>/runs/<method>/seed<k>/scores.json``; ``<out>/summary.md`` and
``<out>/summary.json`` hold mean ± std and every seed's value per method, and
``<out>/curves.png`` and ``<out>/matrix_<method>.png`` the plots. ``--publish DIR`` copies the
summary, the plots and, per run, one small JSON (``runs/<method>_seed<k>.json``: per-stage
metrics, command, wall time, effective config and code commit) and its last stage's answers
(``runs/<method>_seed<k>.eval.jsonl.gz``, which ``tools/rescore.py`` re-scores) to ``DIR``.
Extra ``key=value`` arguments go to every run (e.g. ``data.stages=[1,2]``).

Evaluation uses ``--split`` (``test`` by default). Hyperparameters are chosen with
``--split valid`` (other phrasings of the same facts, and the valid retain/general probes: a
valid run never opens a test phrasing) and only then measured on ``test``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from msl_ds.config import load_config
from msl_ds.evaluation import json_safe
from msl_ds.fingerprint import FILE as FINGERPRINT
from msl_ds.fingerprint import differences, fingerprint
from msl_ds.io import read_json, write_json, write_text

# the methods of docs/PROTOCOL.md. msl_paper is the paper as written: every pbl/augment/select key of
# ds_configs/run_paper.yaml (the paper's value, or a gap the paper leaves, marked there), on top of
# whatever --config sets; msl is the default method (run_cpu_default.yaml); msl_replay adds true
# earlier rows to msl, holding a stated share of each step's loss (replay.weight)
PAPER_CONFIG = "run_paper.yaml"


def paper_overrides(path: str | Path | None = None) -> list[str]:
    """``key=value`` for every key ``run_paper.yaml`` itself writes (not what it extends)."""
    import yaml

    from msl_ds.config import resolve_path

    data = yaml.safe_load(resolve_path(str(path or PAPER_CONFIG)).read_text(encoding="utf-8"))
    data.pop("extends", None)

    def flat(d: dict, prefix: str = "") -> list[str]:
        out = []
        for k, v in d.items():
            if isinstance(v, dict):
                out += flat(v, f"{prefix}{k}.")
            else:
                out.append(f"{prefix}{k}={json.dumps(v)}")
        return out

    return flat(data)


METHODS: dict[str, list[str]] = {
    "sft": ["run.method=sft"],
    "replay": ["run.method=replay"],
    "msl_paper": paper_overrides(),
    "msl": ["run.method=msl"],
    "msl_no_pbl": ["run.method=msl", "pbl.enabled=false"],
    "msl_no_aug": ["run.method=msl", "augment.enabled=false"],
    "msl_no_select": ["run.method=msl", "select.enabled=false"],
    "msl_replay": ["run.method=msl", "replay.in_msl=true", "replay.weight=0.5"],
}
FINAL = ("acc_world", "acc", "bwt", "retain", "general", "outdated_world")  # after the last stage
MEANS = ("new_acc", "kgr", "krr", "conflict_precision", "conflict_recall")  # mean over stages


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(a: argparse.Namespace, method: str, seed: int, threads: int) -> dict[str, Any]:
    """One ``msl-train`` run (``deepspeed --module msl_ds train``); skipped when a finished run with its wall time and this run's
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
        str(free_port()), "--module", "msl_ds", "train", *args,
    ]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(out / "launch.log", "a") as log:
        env = {**os.environ, "MSL_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise SystemExit(f"{method} seed {seed} failed (exit {rc}); see {out / 'launch.log'}")
    info = {"method": method, "seed": seed, "seconds": time.time() - t0, "command": " ".join(cmd)}
    write_json(wall, info)
    print(f"{method} seed {seed}: {info['seconds']:.0f} s", flush=True)
    return info


# --------------------------------------------------------------------------- aggregation


def mean_std(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample std over the seeds that have a value; ``seeds``: every seed's value."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "seeds": values}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "seeds": values}


def score_runs(a: argparse.Namespace, out: Path, methods: list[str], seeds: list[int]) -> None:
    """Re-score every run from its answers and the world files into ``scores.json``."""
    from msl_ds.data import load_world
    from msl_ds.evaluation import rescore_run

    world = load_world(a.data, ("train", a.split), a.split)
    for m in methods:
        for s in seeds:
            run_dir = out / "runs" / m / f"seed{s}"
            ran = read_json(run_dir / "summary.json")
            write_json(
                run_dir / "scores.json",
                {"method": m, "seed": s, **provenance(ran), "stages": rescore_run(run_dir, world, a.split)},
            )


def provenance(run_summary: dict[str, Any]) -> dict[str, Any]:
    """The effective config and code commit a run's ``summary.json`` records (None for a run made
    before msl_ds recorded them)."""
    return {k: run_summary.get(k) for k in ("effective_config", "commit")}


def overrides(method: str, common: list[str]) -> dict[str, str]:
    """The config overrides that define a method's runs (``key=value``), as a dict."""
    return dict(kv.split("=", 1) for kv in [*METHODS[method], *common])


def aggregate(out: Path, methods: list[str], seeds: list[int], common: list[str] = ()) -> dict[str, Any]:
    """Mean ± std over seeds of every reported quantity, per method."""
    result: dict[str, Any] = {}
    for m in methods:
        runs = [read_json(out / "runs" / m / f"seed{s}" / "scores.json")["stages"] for s in seeds]
        walls = [read_json(out / "runs" / m / f"seed{s}" / "wall.json")["seconds"] for s in seeds]
        stages = [st["stage"] for st in runs[0]]
        nan = float("nan")
        final = {k: mean_std([r[-1].get(k, nan) for r in runs]) for k in FINAL}
        final.update({k: mean_std([_mean([st.get(k) for st in r]) for r in runs]) for k in MEANS})
        final["wall_seconds"] = mean_std(walls)
        # the first stage's changed facts (the conflicts): accuracy and old answers given
        changed = [first_stage_changed(out / "runs" / m / f"seed{s}", stages[0]) for s in seeds]
        final["stage1_changed_acc"] = mean_std([c[0] for c in changed])
        final["stage1_changed_outdated"] = mean_std([c[1] for c in changed])
        per_stage = {
            k: [mean_std([r[i].get(k, nan) for r in runs]) for i in range(len(stages))]
            for k in (*FINAL, "new_acc", "kgr", "krr", "outdated", *MEANS[3:])
        }
        cells = {(i, j) for r in runs for i, row in r[-1]["matrix"].items() for j in row}
        matrix = {
            f"{i}/{j}": mean_std([r[-1]["matrix"].get(i, {}).get(j, nan) for r in runs]) for i, j in sorted(cells)
        }
        first = read_json(out / "runs" / m / f"seed{seeds[0]}" / "scores.json")
        result[m] = {**final, "overrides": overrides(m, list(common)), "stages": stages, "per_stage": per_stage}
        # seed 0's effective config (the seeds differ only in run.seed, run.name, run.output_dir)
        result[m].update({k: first.get(k) for k in ("effective_config", "commit")})
        result[m]["matrix"] = matrix
    return result


def _mean(values: list[float | None]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(vals) if vals else float("nan")


def first_stage_changed(run_dir: Path, stage: int) -> tuple[float, float]:
    """(accuracy, share answered with the previous answer) on the changed facts of ``stage``,
    right after it (the stage's own evaluation, as the run recorded it)."""
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
        f"Mean ± std over seeds {seeds}, evaluated on the `{split}` phrasings, every answer scored against the "
        "gold current at the stage evaluated. acc_world (every current fact once), acc, bwt, retain, general and "
        "outdated_world (share of the facts changed so far answered with a superseded value) after the last "
        "stage; new_acc, kgr, krr and conflict precision/recall averaged over stages; stage1_changed_*: the "
        "first stage's changed facts right after it (accuracy, share still answered with the previous answer); "
        "wall_seconds per run.",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for m, r in res.items():
        cells = [_pm(r[c]) if c != "wall_seconds" else f"{r[c]['mean']:.0f}" for c in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    stages = next(iter(res.values()))["stages"]
    for key, title in (
        ("acc_world", "acc_world after each stage"),
        ("acc", "ACC after each stage"),
        ("new_acc", "new_acc per stage (the stage's own facts)"),
    ):
        lines += ["", f"{title}:", "", "| method | " + " | ".join(str(s) for s in stages) + " |"]
        lines.append("|---|" + "---|" * len(stages))
        for m, r in res.items():
            lines.append(f"| {m} | " + " | ".join(_pm(v) for v in r["per_stage"][key]) + " |")
    return "\n".join(lines) + "\n"


def plots(res: dict[str, Any], out: Path) -> list[str]:
    """curves.png and matrix_<method>.png (none, with a note, without matplotlib: msl_ds[plots])."""
    try:
        import matplotlib
    except ImportError:
        print("no plots: matplotlib is not installed (pip install 'msl_ds[plots]')", flush=True)
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, r in res.items():
        mean = [v["mean"] for v in r["per_stage"]["acc_world"]]
        std = [v["std"] for v in r["per_stage"]["acc_world"]]
        ax.errorbar(r["stages"], mean, yerr=std, marker="o", capsize=3, label=m)
    ax.set_xlabel("after stage")
    ax.set_ylabel("acc_world (every current fact, current golds)")
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
    p.add_argument("--config", default="run_cpu_default.yaml", help="run config: a path or a shipped config's name")
    p.add_argument("--data", default="data/world_default", help="a world in the README data layout")
    p.add_argument("--model", default="artifacts/base_default", help="its base model")
    p.add_argument("--out", default="results/compare")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--split", default="test", choices=["test", "valid"])
    p.add_argument("--nproc", type=int, default=2, help="ranks per run")
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--world", default=None, help="the world's name in summary.json (default: --data's folder name)")
    p.add_argument(
        "--publish", default=None, help="copy summary, plots and per-run JSONs here (e.g. docs/results/default)"
    )
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
    score_runs(a, out, a.methods, a.seeds)
    res = aggregate(out, a.methods, a.seeds, a.overrides)
    table = summary_markdown(res, a.seeds, a.split)
    written = plots(res, out)
    meta = {"command": " ".join(sys.argv), "seeds": a.seeds, "seconds": time.time() - t0}
    summary = {"world": a.world or Path(a.data).name, "split": a.split, "meta": meta, "methods": res}
    write_json(out / "summary.json", json_safe(summary))
    write_text(out / "summary.md", table)
    print(table, flush=True)
    print(f"wrote {out / 'summary.md'}, summary.json, {', '.join(written)}")
    if a.publish:
        publish(out, Path(a.publish), a.methods, a.seeds, ["summary.json", "summary.md", *written])


def publish(out: Path, dest: Path, methods: list[str], seeds: list[int], files: list[str]) -> None:
    """Copy the summary, the plots and, per run, one small JSON (its per-stage metrics, command,
    wall time, effective config and commit) and its last stage's per-question answers
    (``runs/<method>_seed<k>.eval.jsonl.gz``, what ``tools/rescore.py`` recomputes acc_world
    from) to ``dest``, for committing."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(out / f, dest / f)
    for m in methods:
        for s in seeds:
            run_dir = out / "runs" / m / f"seed{s}"
            scores = read_json(run_dir / "scores.json")
            record = {**read_json(run_dir / "wall.json"), **provenance(scores), "stages": scores["stages"]}
            write_json(dest / "runs" / f"{m}_seed{s}.json", record)
            last = run_dir / f"stage_{scores['stages'][-1]['stage']:02d}" / "eval.jsonl"
            write_gzip(dest / "runs" / f"{m}_seed{s}.eval.jsonl.gz", last.read_bytes())
    print(f"published to {dest}")


def write_gzip(path: Path, data: bytes) -> None:
    """``data`` gzipped to ``path`` atomically, byte-reproducible (no name or time in the header)."""
    import gzip

    from msl_ds.io import write_bytes

    write_bytes(path, gzip.compress(data, compresslevel=9, mtime=0))


if __name__ == "__main__":
    main()
