"""Join the process group the way msl_ds does and report who is who (tests/test_multinode.py).

Usage: python tests/scripts/slurm_ranks.py REPORT.json   (under srun, or with SLURM_* set by hand)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from msl_ds import distributed as D  # noqa: E402


def main() -> None:
    D.init("gloo", timeout_s=120, threads_per_rank=1)
    me = {"rank": D.rank(), "world": D.world_size(), "local_rank": D.local_rank(), "addr": os.environ["MASTER_ADDR"]}
    everyone = D.all_gather_objects(me)
    if D.is_rank0():
        Path(sys.argv[1]).write_text(json.dumps(everyone))
    D.shutdown()


if __name__ == "__main__":
    main()
