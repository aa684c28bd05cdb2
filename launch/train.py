"""``msl-train`` from a source checkout: every stage of a run config (msl_ds.recipe).

    deepspeed --num_gpus 2 launch/train.py ds_configs/run_cpu_default.yaml [key=value ...]

``--help`` lists the options.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout works without an install

from msl_ds.cli import train as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
