"""Generate a synthetic evolving-knowledge world and print per-stage statistics.

Usage:
    python launch/make_world.py --out DIR [--size tiny|small|default|hard] [--seed 0] [--force]
        [--answer-pool N] [--max-changes N] [--persistence P] [--change-frac F]

The knobs override the preset's (msl_ds.world.WorldSize): ``--answer-pool N`` draws every
relation's values from N values shared by all subjects, ``--max-changes N`` lets a fact change up
to N times, ``--persistence P`` states the old value of every fact that changes later in more
stage-0 contexts and sends its updates with fewer phrasings.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

# Allow running as a plain script from a source checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msl_ds.world import SIZES, WorldSize, generate_world, world_stats, write_world  # noqa: E402

COLUMNS = (
    "stage",
    "facts",
    "base",
    "conflicts",
    "new",
    "unchanged",
    "general",
    "train_rows",
    "valid_rows",
    "test_rows",
)


def stats_table(stats: list[dict[str, int]]) -> str:
    """Render per-stage stats as a Markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in stats]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--size", default="default", choices=sorted(SIZES), help="size preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument(
        "--answer-pool", type=int, default=None, help="values per relation, shared by all subjects (0 = off)"
    )
    p.add_argument("--max-changes", type=int, default=None, help="how many times one fact may change")
    p.add_argument("--persistence", type=float, default=None, help="old values in more stage-0 contexts (0 = off)")
    p.add_argument("--change-frac", type=float, default=None, help="share of changeable facts changed per stage")
    return p.parse_args(argv)


KNOBS = ("answer_pool", "max_changes", "persistence", "change_frac")


def world_size(args: argparse.Namespace) -> str | WorldSize:
    """The preset, or the preset with the knobs given on the command line."""
    over = {k: getattr(args, k) for k in KNOBS if getattr(args, k) is not None}
    return dataclasses.replace(SIZES[args.size], **over) if over else args.size


def main(argv: list[str] | None = None) -> int:
    """Generate, write and summarise a world; return the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.out.exists() and not args.force:
        print(f"error: {args.out} exists (use --force to replace it)", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    try:
        world = generate_world(world_size(args), args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    gen_s = time.perf_counter() - t0
    out = write_world(world, args.out, force=args.force)
    total_s = time.perf_counter() - t0
    print(f"world size={args.size} seed={args.seed} -> {out}")
    print(
        f"retain rows: {len(world.retain)}, general rows: {len(world.general)}; "
        f"generated in {gen_s:.3f}s, written in {total_s - gen_s:.3f}s\n"
    )
    print(stats_table(world_stats(world)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
