"""docs/PROTOCOL.md (version 1) as commands: the validation grid, the rule that picks from it, the test runs.

    python tools/protocol.py valid      # every grid cell on the valid split, 3 seeds (make protocol-valid)
    python tools/protocol.py pick       # the rule's choice from the published valid summaries (make protocol-pick)
    python tools/protocol.py confirm    # the combined choice on valid, when the rule asks for it
    python tools/protocol.py test       # the 8 methods on the test split, 3 seeds (make protocol-test)
    python tools/report.py --results docs/results/default --data data/world_default   (make protocol-report)

``valid`` and ``test`` run ``launch/compare.py`` (resumable: a finished run is skipped) and publish
to ``docs/results/default/valid/<cell>/`` and ``docs/results/default/``. ``test`` refuses to start
unless docs/PROTOCOL.md says ``Defaults frozen: yes`` and the checkout has no uncommitted change to
a tracked file, so every test run's ``commit`` names the frozen code. ``--dry-run`` prints the
commands instead of running them.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VERSION = 1
SEEDS = ["0", "1", "2"]
WORLD = ["--data", "data/world_default", "--model", "artifacts/base_default", "--world", "default"]
# two single-rank runs at a time on a 2-core box; grad_accum 2 keeps the 2-rank global batch
COMMON = ["--nproc", "1", "--seeds", *SEEDS]
JOBS = 2
SHARED = ["train.grad_accum=2"]
METHODS = ["sft", "replay", "msl_paper", "msl", "msl_no_pbl", "msl_no_aug", "msl_no_select", "msl_replay"]
TIE = 0.005  # a change must beat the shipped value's mean valid acc_world by more than this

# cell -> (method, key varied or None for the shipped value, overrides). One key at a time around
# the shipped values; each key's candidates are the cells that vary it plus the method's "base".
GRID: dict[str, tuple[str, str | None, list[str]]] = {
    "msl/base": ("msl", None, []),
    "msl/pp_weight_0": ("msl", "pbl.pp_weight", ["pbl.pp_weight=0"]),
    "msl/pp_weight_1": ("msl", "pbl.pp_weight", ["pbl.pp_weight=1.0"]),
    "msl/np_weight_0.1": ("msl", "pbl.np_weight", ["pbl.np_weight=0.1"]),
    "msl/theta_0.05": ("msl", "select.theta", ["select.theta=0.05"]),
    "msl/theta_0.2": ("msl", "select.theta", ["select.theta=0.2"]),
    "msl/reference_gold": ("msl", "select.reference", ["select.reference=gold"]),
    "msl/rehearsal_every_2": ("msl", "augment.rehearsal_every", ["augment.rehearsal_every=2"]),
    "msl_paper/base": ("msl_paper", None, []),
    "msl_paper/pp_weight_1": ("msl_paper", "pbl.pp_weight", ["pbl.pp_weight=1.0"]),
    "msl_paper/np_weight_1": ("msl_paper", "pbl.np_weight", ["pbl.np_weight=1.0"]),
    "msl_paper/theta_0.05": ("msl_paper", "select.theta", ["select.theta=0.05"]),
    "msl_paper/theta_0.2": ("msl_paper", "select.theta", ["select.theta=0.2"]),
}
VALID_DIR = "docs/results/default/valid"
TEST_DIR = "docs/results/default"


def compare(method_args: list[str], out: str, publish: str, split: str, overrides: list[str],
            jobs: int = JOBS) -> list[str]:  # fmt: skip
    return [
        sys.executable, "launch/compare.py", *WORLD, "--jobs", str(jobs), *COMMON, *method_args, "--split", split,
        "--out", out, "--publish", publish, *SHARED, *overrides,
    ]  # fmt: skip


def valid_commands(cells: list[str] | None = None, jobs: int = JOBS) -> list[list[str]]:
    """The grid's compare commands; ``cells`` (fnmatch patterns) runs a part of it, so two
    processes with ``--jobs 1`` keep two runs in flight where one with ``--jobs 2`` idles a core
    on every cell's third seed."""
    unknown = [c for c in cells or [] if not fnmatch.filter(GRID, c)]
    if unknown:
        raise SystemExit(f"--cells {unknown} match no grid cell; cells: {', '.join(GRID)}")
    return [
        compare(
            ["--methods", m], f"results/protocol_v{VERSION}/valid/{cell}", f"{VALID_DIR}/{cell}", "valid", over, jobs
        )  # fmt: skip
        for cell, (m, _, over) in GRID.items()
        if cells is None or any(fnmatch.fnmatch(cell, c) for c in cells)
    ]


def mean_acc(cell: str, root: Path = REPO / VALID_DIR) -> float | None:
    path = root / cell / "summary.json"
    if not path.is_file():
        return None
    methods = json.loads(path.read_text())["methods"]
    return next(iter(methods.values()))["acc_world"]["mean"]


def pick(root: Path = REPO / VALID_DIR) -> dict[str, dict]:
    """Per method: each key's chosen value (the best mean valid acc_world over 3 seeds; the
    shipped value unless a change beats it by more than TIE), the combined overrides, and
    whether a confirmation run is needed (two or more keys changed)."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(m for m, _, _ in GRID.values()):
        base = mean_acc(f"{method}/base", root)
        missing = [c for c, (m, _, _) in GRID.items() if m == method and mean_acc(c, root) is None]
        if missing:
            out[method] = {"missing": missing}
            continue
        chosen, best_single = [], (base, f"{method}/base", [])
        for key in dict.fromkeys(k for m, k, _ in GRID.values() if m == method and k):
            cells = [(mean_acc(c, root), c, over) for c, (m, k, over) in GRID.items() if m == method and k == key]
            acc, cell, over = max(cells)
            if acc > base + TIE:
                chosen += over
                best_single = max(best_single, (acc, cell, over))
        out[method] = {"base_acc_world": base, "overrides": chosen, "best_single": best_single[1],
                       "best_single_overrides": best_single[2], "confirm": len(chosen) >= 2}  # fmt: skip
    return out


def confirm_commands(choice: dict[str, dict]) -> list[list[str]]:
    """The combined choice on valid (3 seeds), for the methods where two or more keys changed:
    adopted only if its mean valid acc_world is at least the best single change's, else that one."""
    return [
        compare(
            ["--methods", m],
            f"results/protocol_v{VERSION}/valid/{m}/confirm",
            f"{VALID_DIR}/{m}/confirm",
            "valid",
            c["overrides"],
        )  # fmt: skip
        for m, c in choice.items()
        if c.get("confirm")
    ]


def test_commands() -> list[list[str]]:
    return [compare(["--methods", *METHODS], f"results/protocol_v{VERSION}/test", TEST_DIR, "test", [])]


def frozen_or_exit(repo: Path = REPO) -> None:
    text = (repo / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    if "Defaults frozen: yes" not in text:
        raise SystemExit("docs/PROTOCOL.md does not say 'Defaults frozen: yes': run the valid grid, apply the rule, "
                         "commit the chosen defaults and the frozen line first (PROTOCOL.md, 'Freezing')")  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                           text=True).stdout.strip()  # fmt: skip
    if dirty:
        raise SystemExit(f"uncommitted changes to tracked files; the test runs must name a clean commit:\n{dirty}")


def inputs_or_exit(repo: Path = REPO) -> None:
    """The world must be generator version 3 (the held-out general probe) and the base model built
    from it: a world or base made by earlier code would be reused silently by ``make base``."""
    world, base = repo / "data" / "world_default", repo / "artifacts" / "base_default"
    meta = world / "world.json"
    fix = "rm -rf data/world_default artifacts/base_default && make base"
    if not meta.is_file() or json.loads(meta.read_text()).get("version", 0) < 3:
        raise SystemExit(f"{world}: missing or made before generator version 3; {fix}")
    made = base / "base_metrics.json"
    if not made.is_file() or made.stat().st_mtime < meta.stat().st_mtime:
        raise SystemExit(f"{base}: missing or older than {meta}; {fix}")


def run_all(commands: list[list[str]], dry: bool) -> None:
    for cmd in commands:
        print(shlex.join(cmd), flush=True)
        if not dry:
            subprocess.run(cmd, cwd=REPO, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["valid", "pick", "confirm", "test"])
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--cells", nargs="+", help="valid: only these grid cells (fnmatch patterns, e.g. 'msl/*')")
    p.add_argument("--jobs", type=int, default=JOBS, help="valid: runs in flight per compare command")
    a = p.parse_args(argv)
    if a.step in ("valid", "confirm", "test") and not a.dry_run:
        inputs_or_exit()
    if a.step == "valid":
        run_all(valid_commands(a.cells, a.jobs), a.dry_run)
    elif a.step == "pick":
        print(json.dumps(pick(), indent=2))
    elif a.step == "confirm":
        run_all(confirm_commands(pick()), a.dry_run)
    else:
        if not a.dry_run:
            frozen_or_exit()
        run_all(test_commands(), a.dry_run)
        if not a.dry_run:  # the base model's own evaluation, for the report's "general >= base - 5 pts"
            shutil.copyfile(
                REPO / "artifacts" / "base_default" / "base_metrics.json", REPO / TEST_DIR / "base_metrics.json"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
