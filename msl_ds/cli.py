"""The command lines: ``msl-train`` (``launch/train.py``) and ``msl-make-world`` (``launch/make_world.py``).

    deepspeed --num_gpus 2 launch/train.py ds_configs/run_cpu_default.yaml [key=value ...]
    deepspeed --num_gpus 8 $(which msl-train) run_gpu_8b.yaml [key=value ...]   # after pip install
    mpirun -np 2 python launch/train.py ds_configs/run_cpu_default.yaml          # or srun, torchrun
    msl-train CONFIG --check [key=value ...]           # validate config, data, model; start nothing
    msl-train CONFIG --print-config [key=value ...]    # the resolved config, as YAML
    msl-make-world --out data/world_default --size default

A config is a path, or the name of a shipped config (``run_cpu_default.yaml``, ``run_gpu_8b.yaml``,
``run_cpu_tiny.yaml``). ``msl-compare`` is :mod:`msl_ds.compare`, ``msl-make-base`` :mod:`msl_ds.base`;
the stage recipe itself is :mod:`msl_ds.recipe`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from msl_ds.config import ConfigError, dump_yaml, load_config, load_deepspeed_config
from msl_ds.data import DataError
from msl_ds.engine import CheckpointWorldSizeError
from msl_ds.modeling import ModelError
from msl_ds.world import SIZES, WorldSize, file_checksums, generate_world, world_stats, write_world

BAD_INPUT = (ConfigError, DataError, ModelError, CheckpointWorldSizeError)


# --------------------------------------------------------------------------- msl-train


def _train_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="msl-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("config", help="run config YAML: a path or a shipped config's name (ds_configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4")
    p.add_argument("--check", action="store_true", help="validate config, data, model and tokenizer; start nothing")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return p.parse_intermixed_args(argv)  # options may stand between the overrides


def train(argv: list[str] | None = None) -> None:
    """``msl-train``: run (or resume) every stage of a config; ``--check`` / ``--print-config``."""
    from msl_ds.recipe import Recipe  # the heavy imports (DeepSpeed) only when a run is asked for

    args = _train_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="", flush=True)
            return
        recipe = Recipe(cfg)
        if args.check:
            check_only(recipe)
            return
        recipe.setup()
        recipe.run()
    except BAD_INPUT as exc:  # bad input: one clear line, exit 2
        print(f"msl_ds: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    recipe.cleanup()  # on an error the process exits without a barrier the dead rank would hang


def check_only(recipe) -> None:
    """``--check``: validate config, data, model dir and tokenizer; start nothing, write nothing."""
    t0 = time.time()
    recipe.check()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    load_deepspeed_config(recipe.cfg, world_size)
    w, cfg = recipe.world, recipe.cfg
    rows = {t: len(w.split(t, "train")) for t in recipe.stages}
    base = (
        ", with stage 0"
        if 0 in w.stages
        else f", no stage 0 (the base row is the model before stage {recipe.stages[0]})"
    )
    print(
        f"msl_ds: check passed in {time.time() - t0:.1f} s: config {cfg.source} (method {cfg.run.method}); "
        f"data {cfg.data.dir} (format {cfg.data.format}): stages {recipe.stages}, training rows {rows}, "
        f"evaluation on '{cfg.data.eval_split}'{base}; model {cfg.model.path} "
        f"(tokenizer: {type(recipe.tokenizer).__name__}); DeepSpeed {cfg.deepspeed.config} for {world_size} rank(s)",
        flush=True,
    )


# --------------------------------------------------------------------------- msl-make-world

MAKE_WORLD = """Generate a synthetic evolving-knowledge world and print per-stage statistics.

    msl-make-world --out DIR [--size tiny|small|default|hard] [--seed 0] [--force]
        [--answer-pool N] [--max-changes N] [--persistence P] [--change-frac F]

The knobs override the preset's (msl_ds.world.WorldSize): ``--answer-pool N`` draws every
relation's values from N values shared by all subjects, ``--max-changes N`` lets a fact change up
to N times, ``--persistence P`` states the old value of every fact that changes later in more
stage-0 contexts and sends its updates with fewer phrasings.
"""

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


def _world_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="msl-make-world", description=MAKE_WORLD, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--size", default="default", choices=sorted(SIZES), help="size preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument(
        "--update",
        action="store_true",
        help="keep an existing output directory that holds exactly this world, replace it otherwise (make world)",
    )
    p.add_argument(
        "--answer-pool", type=int, default=None, help="values per relation, shared by all subjects (0 = off)"
    )
    p.add_argument("--max-changes", type=int, default=None, help="how many times one fact may change")
    p.add_argument("--persistence", type=float, default=None, help="old values in more stage-0 contexts (0 = off)")
    p.add_argument("--change-frac", type=float, default=None, help="share of changeable facts changed per stage")
    g = p.add_argument_group("a known-facts world from real data (--source geonames; pip install 'msl_ds[smollm2]')")
    g.add_argument("--source", default="embedded", choices=("embedded", "geonames"), help="where the facts come from")
    g.add_argument("--model", default=None, help="geonames: the HF model dir whose knowledge the world keeps")
    g.add_argument("--stages", type=int, default=2, help="geonames: stages after stage 0")
    g.add_argument("--changes", type=int, default=6, help="geonames: counterfactual changes of known facts per stage")
    g.add_argument("--twice", type=int, default=2, help="geonames: of those, facts an earlier stage changed already")
    g.add_argument("--new", type=int, default=6, help="geonames: fictional countries per stage")
    g.add_argument("--retain", type=int, default=10, help="geonames: known facts no stage changes")
    g.add_argument("--general", type=int, default=11, help="geonames: known continents of otherwise unused countries")
    g.add_argument("--candidates", type=int, default=80, help="geonames: most populous countries asked about")
    g.add_argument("--known-share", type=float, default=1.0, help="geonames: share of phrasings right to keep a fact")
    g.add_argument("--templates", type=Path, default=None, help="geonames: question phrasings (JSON; default shipped)")
    g.add_argument("--max-new-tokens", type=int, default=24, help="geonames: answer length cap when asking the model")
    g.add_argument("--batch-size", type=int, default=32, help="geonames: questions per generate call")
    g.add_argument("--answers", type=Path, default=None,
                   help="geonames: the model's answers, kept between builds (default: OUT.answers.json)")  # fmt: skip
    return p.parse_args(argv)


KNOBS = ("answer_pool", "max_changes", "persistence", "change_frac")


def _world_size(args: argparse.Namespace) -> str | WorldSize:
    """The preset, or the preset with the knobs given on the command line."""
    over = {k: getattr(args, k) for k in KNOBS if getattr(args, k) is not None}
    return dataclasses.replace(SIZES[args.size], **over) if over else args.size


def _written_checksums(out: Path) -> dict[str, str] | None:
    """sha256 of the data files on disk that ``out/world.json`` lists (None: no readable world)."""
    try:
        names = json.loads((out / "world.json").read_text())["files"]
        return {p: hashlib.sha256((out / p).read_bytes()).hexdigest() for p in sorted(names)}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no world, or a broken one: rewritten


def make_world(argv: list[str] | None = None) -> int:
    """``msl-make-world``: generate, write and summarise a world; return the exit code."""
    args = _world_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.out.exists() and not (args.force or args.update):
        print(f"error: {args.out} exists (use --force to replace it)", file=sys.stderr)
        return 1
    if args.source == "geonames":
        return make_known_world(args)
    t0 = time.perf_counter()
    try:
        world = generate_world(_world_size(args), args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    gen_s = time.perf_counter() - t0
    if args.update and args.out.exists():
        if _written_checksums(args.out) == file_checksums(world):
            print(f"world up to date: {args.out}")
            return 0
        print(f"{args.out} holds another world (an older generator or other options): replacing it")
    out = write_world(world, args.out, force=args.force or args.update)
    total_s = time.perf_counter() - t0
    print(f"world size={args.size} seed={args.seed} -> {out}")
    print(
        f"retain rows: {len(world.retain)}, general rows: {len(world.general)}; "
        f"generated in {gen_s:.3f}s, written in {total_s - gen_s:.3f}s\n"
    )
    print(stats_table(world_stats(world)))
    return 0


def make_known_world(args: argparse.Namespace) -> int:
    """``msl-make-world --source geonames --model DIR``: the known-facts world of a checkpoint."""
    from msl_ds.worlds import geonames
    from msl_ds.worlds.asking import cached_asker, model_asker, model_key

    if not args.model:
        print(
            "error: --source geonames needs --model (the checkpoint whose knowledge the world keeps)", file=sys.stderr
        )
        return 2
    t0 = time.perf_counter()
    try:
        templates = geonames.load_templates(args.templates or geonames.TEMPLATES)
        spec = geonames.KnownWorldSpec(
            stages=args.stages, changes=args.changes, twice=args.twice, new=args.new, retain=args.retain,
            general=args.general, candidates=args.candidates, seed=args.seed, templates=templates,
            known_share=args.known_share,
        )  # fmt: skip
        countries = geonames.source_facts(args.candidates)
        cache = args.answers or args.out.with_name(args.out.name + ".answers.json")
        ask = cached_asker(
            model_asker(args.model, args.max_new_tokens, args.batch_size),
            cache,
            model_key(args.model, args.max_new_tokens),
        )
        world = geonames.build_known_world(countries, ask, spec, str(args.model))
    except (ValueError, ImportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = write_world(world, args.out, force=args.force or args.update)  # --update: rebuilt (asked again)
    print(f"known world (geonames, model {args.model}) -> {out} in {time.perf_counter() - t0:.0f}s")
    print(f"known facts among {len(countries)} countries: {world.meta['known_facts']}")
    print("base accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in world.meta["base_accuracy"].items()))
    return 0
