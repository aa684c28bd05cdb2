"""``msl-make-world`` from a source checkout: a synthetic evolving-knowledge world.

    python launch/make_world.py --out data/world_default [--size default]

``--help`` lists the options.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout works without an install

from msl_ds.cli import make_world as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
