"""eval.gather_max_gib=auto on 2 CPU ranks (gloo), a real ZeRO-3 engine: every rank picks the same mode.

    deepspeed --num_gpus 2 tests/scripts/gen_mode_ranks.py OUT.json SMALL_MEMINFO

Rank 1 reads its free memory from SMALL_MEMINFO (a /proc/meminfo with little MemAvailable), rank 0
from the machine's: rank 0 decides from the smallest measurement and broadcasts, so both ranks
must choose synced; with the same headroom and rank 1 reading the machine's file they choose
gathered; a number is taken as written. Rank 0 writes what each rank chose.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from msl_ds import distributed as D
    from msl_ds import generation as G

    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, small = Path(args[0]), args[1]
    D.init("gloo", threads_per_rank=1)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    module = engine.module
    chose = {}
    for case, meminfo in (("rank1_small", small if D.rank() == 1 else G.MEMINFO), ("both_machine", G.MEMINFO)):
        G.release_generation_copy()  # measure again
        G.MEMINFO = meminfo
        chose[case] = G.choose_mode(module, G.GenConfig(gather_max_gib="auto", gather_headroom_gib=0.5))
        G.MEMINFO = "/proc/meminfo"
    G.release_generation_copy()
    chose["number"] = G.choose_mode(module, G.GenConfig(gather_max_gib=0.0))  # nothing fits 0 GiB
    everyone = D.all_gather_objects(chose)
    if D.is_rank0():
        out.write_text(json.dumps({"ranks": everyone, "need_bytes": G.full_param_bytes(module)}))
    D.destroy_engine(engine)
    D.shutdown()


if __name__ == "__main__":
    main()
