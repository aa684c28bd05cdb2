"""Generate a synthetic evolving-knowledge world and print per-stage statistics.

Usage:
    python launch/make_world.py --out DIR [--size tiny|small|default] [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

# Allow running as a plain script from a source checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msl_ds.world import SIZES, generate_world, world_stats, write_world  # noqa: E402

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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Generate, write and summarise a world; return the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.out.exists() and not args.force:
        print(f"error: {args.out} exists (use --force to replace it)", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    world = generate_world(args.size, args.seed)
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
