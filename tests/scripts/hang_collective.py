"""Run on 2 ranks by tests/test_timeout.py: rank 1 never joins the step's all-reduce.

Rank 0 must fail after ``deepspeed.timeout_s`` (given as an override) with a message naming the
setting; the launcher then stops rank 1. Arguments: config overrides, e.g. deepspeed.timeout_s=3.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from msl_ds import distributed as D  # noqa: E402
from msl_ds.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def main(overrides: list[str]) -> None:
    cfg = load_config(ROOT / "ds_configs" / "run_cpu_tiny.yaml", ["deepspeed.backend=gloo", *overrides])
    D.init(cfg.deepspeed.backend, cfg.deepspeed.timeout_s, threads_per_rank=1)
    D.barrier()  # both ranks are up
    if D.rank() == 1:
        time.sleep(600)  # hung: never reaches the collective (the launcher kills it)
    D.all_reduce_sum([1.0])
    raise SystemExit("the all-reduce returned although rank 1 never joined it")


if __name__ == "__main__":
    main(sys.argv[1:])
