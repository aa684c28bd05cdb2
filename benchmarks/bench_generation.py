"""Augment-phase generation: full weights gathered once per rank against per-token ZeRO-3 gathering.

    make base   # the default world and base model
    deepspeed --num_gpus 2 benchmarks/bench_generation.py [--model artifacts/base_default]
        [--data data/world_default] [--stage 1] [--repeats 1] [--set model.dtype=bf16] [--json out.json]

Runs the whole augmentation phase of one stage (the model's own answers, backgrounds,
paraphrases and expansions, and its answers to every rewrite: exactly the jobs of
``msl_ds.augment.augment_stage``) twice in this one invocation on the same ranks and the same
ZeRO-3 engine:

* **gathered** — each rank gathers the full weights once into a plain copy and generates its
  shard of the jobs with batching and a KV cache (what msl_ds does when the weights fit);
* **synced** — the naive ZeRO-3 way: every rank steps through ``generate(synced_gpus=True)``
  together, parameters gathered layer by layer for every new token.

Both produce the same records (checked). Tokens count the generated text re-tokenised.
Rank 0 prints a table with the wall-time ratio synced / gathered.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from msl_ds import distributed as D  # noqa: E402
from msl_ds.augment import augment_stage  # noqa: E402
from msl_ds.config import load_config, load_deepspeed_config  # noqa: E402
from msl_ds.data import load_world  # noqa: E402
from msl_ds.engine import build_engine  # noqa: E402
from msl_ds.generation import GenConfig  # noqa: E402
from msl_ds.modeling import load_tokenizer  # noqa: E402
from msl_ds.monitor import set_progress  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def generated_tokens(tok, records) -> int:
    texts = [r["raw"] for r in records if r["kind"] != "background"] + [r.get("y_hat", "") for r in records]
    own = {r["source_id"]: r.get("own", "") for r in records}
    return sum(len(tok.encode(t, add_special_tokens=False)) for t in [*texts, *own.values()] if t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(ROOT / "ds_configs" / "run_cpu_default.yaml"))
    p.add_argument("--model", default=str(ROOT / "artifacts" / "base_default"))
    p.add_argument("--data", default=str(ROOT / "data" / "world_default"))
    p.add_argument("--stage", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run-config overrides (model.dtype=bf16)")
    p.add_argument("--json", default=None, help="also write the results here (rank 0)")
    p.add_argument("--local_rank", type=int, default=None)
    a = p.parse_args()
    cfg = load_config(a.config, [f"model.path={a.model}", f"data.dir={a.data}", "monitor.tensorboard=false", *a.set])
    D.init(cfg.deepspeed.backend, cfg.deepspeed.timeout_s, cfg.deepspeed.threads_per_rank)
    set_progress(False)
    ds = load_deepspeed_config(cfg, D.world_size())
    world = load_world(a.data)
    rows = world.split(a.stage, "train")
    earlier = [r for s in sorted(world.stages) if s < a.stage for r in world.split(s, "train")]
    tok = load_tokenizer(a.model)
    engine, pad = build_engine(cfg, ds, a.model)
    results, outputs = {}, {}
    for mode in ("gathered", "synced"):
        gen = dataclasses.replace(GenConfig.from_eval(cfg.eval, cfg.run.seed), mode=mode)
        seconds = []
        for _ in range(a.repeats):
            D.barrier()
            t0 = time.perf_counter()
            records = augment_stage(engine.module, tok, pad, rows, earlier, cfg.augment, cfg.skills, gen, 1, a.stage)
            D.barrier()
            seconds.append(time.perf_counter() - t0)
        results[mode] = (min(seconds), generated_tokens(tok, records))
        outputs[mode] = records
    same = outputs["gathered"] == outputs["synced"]
    if D.is_rank0():
        n = len(outputs["gathered"])
        print(
            f"\nAugment-phase generation, {D.world_size()} ranks, {cfg.deepspeed.config}, {a.model}, stage {a.stage}: "
            f"{len(rows)} training rows -> {n} samples; best of {a.repeats}; identical outputs: {same}"
        )
        print("| mode | seconds | tokens | tokens/s | speed-up vs synced |")
        print("|---|---|---|---|---|")
        base = results["synced"][0]
        for mode, (sec, tokens) in results.items():
            print(f"| {mode} | {sec:.2f} | {tokens} | {tokens / sec:.0f} | {base / sec:.2f}x |")
        if a.json:
            rates = {m: {"seconds": sec, "tokens": t, "tokens_per_s": t / sec} for m, (sec, t) in results.items()}
            Path(a.json).write_text(json.dumps({"world": D.world_size(), "identical": same, "modes": rates}, indent=1))
    D.destroy_engine(engine)
    D.shutdown()
    if not same:
        raise SystemExit("gathered and synced generation disagree")


if __name__ == "__main__":
    main()
