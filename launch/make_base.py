"""``msl-make-base`` from a source checkout: a base model that knows a world's stage 0 (msl_ds.base).

    deepspeed --num_gpus 2 launch/make_base.py ds_configs/run_cpu_default.yaml [key=value ...]

``--help`` lists the options.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout works without an install

from msl_ds.base import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
