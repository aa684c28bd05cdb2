"""Acceptance of augmentation per kind, for a checkpoint, a world and a run config's prompts.

    python benchmarks/bench_augment_acceptance.py ds_configs/run_cpu_smollm2.yaml [--facts 4] [--stage 1]
        [--prompts default|config] [key=value ...]

Runs the augmentation phase of one stage (``msl_ds.augment.augment_stage``, then ``select``, as a
run does, in one process) on the first ``--facts`` facts of the stage's training rows, and prints
generated/accepted per kind, the rejection reasons and the accepted rows that state a superseded
value (``aug_stale_accepted``). ``--prompts default`` swaps in the reference run's ``skills``
prompts (run_cpu_default.yaml), to measure what the config's prompts change.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--facts", type=int, default=4, help="facts of the stage to augment")
    p.add_argument("--stage", type=int, default=1)
    p.add_argument("--prompts", choices=("config", "default"), default="config")
    p.add_argument("--json", type=Path, default=None, help="also write the metrics and records here")
    a = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from msl_ds.augment import (
        acceptance,
        augment_seed,
        augment_stage,
        fits_in,
        resolve_caps,
        select,
        stale_oracle,
        words,
    )  # fmt: skip
    from msl_ds.config import SkillsSection, load_config
    from msl_ds.data import load_world
    from msl_ds.facts import fact_key
    from msl_ds.generation import GenConfig

    cfg = load_config(a.config, a.overrides)
    skills = SkillsSection() if a.prompts == "default" else cfg.skills
    world = load_world(cfg.data.dir, ("train",), "valid")
    rows = world.split(a.stage, "train")
    keep = sorted({fact_key(r) for r in rows}, key=str)[: a.facts]
    rows = [r for r in rows if fact_key(r) in keep]
    earlier = world.train_before(a.stage)
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen = GenConfig.from_eval(cfg.eval, cfg.run.seed)
    t0 = time.perf_counter()
    seed = augment_seed(cfg.run.seed, a.stage)
    aug = resolve_caps(cfg.augment, tok, world.split(a.stage, "train"), cfg.data.max_seq_len)
    records = augment_stage(model, tok, pad, rows, earlier, aug, skills, gen, seed, a.stage)
    corpus = {w for r in rows + earlier for w in words(f"{r['question']} {r['answer']}")}
    select(records, cfg.select, fits_in(tok, cfg.data.max_seq_len), corpus)
    m = acceptance(records, stale_oracle(earlier + world.split(a.stage, "train")))
    print(f"prompts: {a.prompts}; {len(keep)} facts, {len(rows)} rows; {time.perf_counter() - t0:.0f}s")
    print(json.dumps(m, indent=1, sort_keys=True))
    for r in records:
        print(f"[{r['kind']}] {r['reason']}: {r['raw'][:100]!r}")
    if a.json:
        a.json.write_text(json.dumps({"metrics": m, "records": records}, indent=1))


if __name__ == "__main__":
    main()
