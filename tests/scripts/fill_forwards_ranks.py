"""The same training steps with forwards filled up to a token budget as with micro-batches.

    deepspeed --num_gpus 2 tests/scripts/fill_forwards_ranks.py OUT.json CONFIG [key=value ...]

Groups from the world's stage 0-1 training rows (every third one with an aligned and a
conflicting candidate, as the probe attaches them), trained for a few steps twice from the same
base model on real ZeRO-3 engines: once as micro-batches (``train.micro_batch_size=4``,
``train.grad_accum=2``: 16 groups per step on 2 ranks), once as ``train.global_batch_size=16``
with filled forwards (``train.max_tokens_per_micro_batch``: a budget that takes a rank's step in
one forward, and a tight one that needs several, with filler forwards). Rank 0 writes each run's
per-step losses, its forwards and filler forwards and the largest difference of the final
weights from the micro-batch run (tests/test_batching_ranks.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from msl_ds import distributed as D  # noqa: E402
from msl_ds.batching import step_forwards  # noqa: E402
from msl_ds.config import batch_shape, load_config, load_deepspeed_config  # noqa: E402
from msl_ds.data import encode_rows, load_world, stage_plan  # noqa: E402
from msl_ds.engine import build_engine, set_total_steps  # noqa: E402
from msl_ds.kernels import ROLE_ALIGNED, ROLE_CONFLICT, LossConfig  # noqa: E402
from msl_ds.modeling import load_tokenizer  # noqa: E402
from msl_ds.monitor import Monitor, set_progress  # noqa: E402
from msl_ds.trainer import StageTrainer  # noqa: E402

STEPS = 4
RUNS = {
    "micro": ["train.micro_batch_size=4", "train.grad_accum=2"],
    "filled": ["train.global_batch_size=16", "train.max_tokens_per_micro_batch=400"],
    "tight": ["train.global_batch_size=16", "train.max_tokens_per_micro_batch=120"],  # several forwards, fillers
}


def groups(cfg, tok):
    world = load_world(cfg.data.dir)
    rows = world.split(0, "train") + world.split(1, "train")
    ex = encode_rows(tok, rows, cfg.data.max_seq_len, "truncate", cfg.data.dir)
    for i, g in enumerate(ex):
        if i % 3 == 0:
            other = rows[(i + 1) % len(rows)]["answer"]
            aligned, wrong = encode_rows(
                tok, [g.row, {**g.row, "answer": other}], cfg.data.max_seq_len, "truncate", cfg.data.dir
            )
            aligned.role, aligned.ref_logp = ROLE_ALIGNED, -1.0
            wrong.role, wrong.ref_logp = ROLE_CONFLICT, -6.0
            g.ref_logp, g.candidates = -1.0, [aligned, wrong]
    return ex


def train(cfg, ex, counts: list[int]):
    """STEPS steps on a fresh engine from the base model: per-step losses and the final weights."""
    ds = load_deepspeed_config(cfg, D.world_size())
    engine, pad = build_engine(cfg, ds, cfg.model.path, STEPS)
    plan = stage_plan(ex, cfg.train, D.world_size(), seed=7)
    set_total_steps(engine, cfg.train, len(plan))
    hook = engine.module.register_forward_hook(lambda *a: counts.append(1))
    loss = LossConfig(nll_weight=1.0, pp_weight=0.3, np_weight=0.2, form="sigmoid")
    t = StageTrainer(engine, cfg.train, ex, plan, pad, 1, Monitor("", enabled=False), lambda s: None, loss_cfg=loss)
    t.run()
    hook.remove()
    weights = D.full_state_dict(engine.module)
    D.destroy_engine(engine)
    return [h["loss"] for h in t.history], plan, weights


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, config, overrides = Path(args[0]), args[1], args[2:]
    base = [*overrides, f"train.max_steps={STEPS}", "train.log_every_steps=1", "train.warmup_steps=0"]
    set_progress(False)
    found, weights = {}, {}
    for name, extra in RUNS.items():
        cfg = load_config(config, [*base, *extra])
        if not found:
            D.init(cfg.deepspeed.backend, cfg.deepspeed.timeout_s, cfg.deepspeed.threads_per_rank)
        ex = groups(cfg, load_tokenizer(cfg.model.path))
        counts: list[int] = []
        losses, plan, weights[name] = train(cfg, ex, counts)
        shape = batch_shape(cfg.train, D.world_size())
        fillers = sum(f is None for b in plan for r in step_forwards(b, shape, D.world_size(), ex) for f in r)
        found[name] = {"losses": losses, "forwards": len(counts), "fillers": fillers, "plan": plan}
    if D.is_rank0():
        for name in RUNS:
            found[name]["max_weight_diff"] = max(
                (weights["micro"][k] - w).abs().max().item() for k, w in weights[name].items()
            )
        found["grouped"] = sum(1 for g in ex if g.candidates)
        out.write_text(json.dumps(found))
    D.shutdown()


if __name__ == "__main__":
    main()
