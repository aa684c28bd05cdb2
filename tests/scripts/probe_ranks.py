"""Run the PBL probe and the augmentation on one stage under any launcher; write both (rank 0).

    deepspeed --num_gpus 2 tests/scripts/probe_ranks.py OUT.json STAGE CONFIG [key=value ...]

Builds the stage-start ZeRO-3 engine exactly as launch/train.py does and calls
``msl_ds.probe.probe_stage`` and ``msl_ds.augment.run_augment``; the output (candidates,
labels, reference log-probs; augmentations and their selection) must not depend on the number
of ranks (tests/test_probe.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from msl_ds import distributed as D  # noqa: E402
from msl_ds.augment import run_augment  # noqa: E402
from msl_ds.config import load_config, load_deepspeed_config  # noqa: E402
from msl_ds.data import load_world  # noqa: E402
from msl_ds.engine import build_engine  # noqa: E402
from msl_ds.generation import GenConfig  # noqa: E402
from msl_ds.modeling import load_tokenizer  # noqa: E402
from msl_ds.probe import probe_metrics, probe_seed, probe_stage  # noqa: E402


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, stage, config, overrides = Path(args[0]), int(args[1]), args[2], args[3:]
    cfg = load_config(config, overrides)
    D.init(cfg.deepspeed.backend, cfg.deepspeed.timeout_s, cfg.deepspeed.threads_per_rank)
    ds = load_deepspeed_config(cfg, D.world_size())
    tok = load_tokenizer(cfg.model.path)
    engine, pad = build_engine(cfg, ds, cfg.model.path, 1)
    world = load_world(cfg.data.dir)
    rows = world.split(stage, "train")
    gen = GenConfig.from_eval(cfg.eval, cfg.run.seed)
    probed = probe_stage(
        engine, tok, pad, rows, cfg.pbl, gen, probe_seed(cfg.run.seed, stage), cfg.data.max_seq_len,
        cfg.skills.background_prompt,
    )  # fmt: skip
    augmented = run_augment(engine.module, tok, pad, world, stage, cfg, gen)
    if D.is_rank0():
        found = {"probe": probed, "metrics": probe_metrics(probed), "augment": augmented}
        out.write_text(json.dumps(found, sort_keys=True))
    D.destroy_engine(engine)
    D.shutdown()


if __name__ == "__main__":
    main()
