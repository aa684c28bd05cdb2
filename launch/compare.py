"""``msl-compare`` from a source checkout: the methods compared on one world (msl_ds.compare).

    python launch/compare.py --out results/default [--methods ...] [--seeds ...]

``--help`` lists the options.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout works without an install

from msl_ds.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
