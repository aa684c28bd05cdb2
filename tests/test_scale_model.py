"""benchmarks/scale_model.py agrees with the batcher, and docs/SCALE.md with the script."""

from __future__ import annotations

import importlib.util
import math
import re
import sys

import pytest

from msl_ds.batching import padded_tokens, rank_forwards
from msl_ds.config import CONFIG_DIR, batch_shape, load_config
from msl_ds.data import stage_plan

REPO = CONFIG_DIR.parent


@pytest.fixture(scope="module")
def scale_model():
    spec = importlib.util.spec_from_file_location("scale_model", REPO / "benchmarks" / "scale_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["scale_model"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_forwards_per_stage_are_the_batchers(scale_model):
    """The 8B config on 16 ranks: the plan msl_ds trains (stage_plan, then each rank's own
    rank_forwards) has exactly the scale model's forwards, steps and padded tokens."""
    cfg = load_config(CONFIG_DIR / "run_gpu_8b.yaml")
    w = scale_model.load_workload("run_gpu_8b.yaml", facts=600)
    assert w.train == cfg.train and w.samples == cfg.pbl.samples  # the model reads the run config
    model = scale_model.train_plan(w, 16)
    ex = scale_model.stage_groups(w)
    shape = batch_shape(cfg.train, 16)
    forwards, tokens = [0] * 16, 0
    plan = stage_plan(ex, cfg.train, 16, w.seed)
    for batch in plan:
        mine = [rank_forwards(batch, shape, 16, r, ex) for r in range(16)]
        assert len({len(f) for f in mine}) == 1  # every rank runs as many
        for r, fw in enumerate(mine):
            forwards[r] += len(fw)
            tokens += sum(padded_tokens([ex[i] for i in f]) for f in fw if f is not None)
    assert forwards == [model.forwards] * 16 and model.steps == len(plan)
    assert model.fillers == 0 and model.tokens == tokens  # no filler forwards in this plan
    # by hand: 128 groups per step, 8 per rank, always under 16k padded tokens: one forward per step
    assert shape.groups == 128 and model.forwards == cfg.train.epochs * math.ceil(len(ex) / 128)


def test_scale_doc_tables_are_the_scripts(scale_model):
    """docs/SCALE.md's train-phase rows for 8B on 16 and 70B on 64 GPUs are what the script prints."""
    doc = (REPO / "docs" / "SCALE.md").read_text()
    w = scale_model.load_workload("run_gpu_8b.yaml")
    hw = scale_model.Hardware()
    for m, gpus in ((scale_model.LLAMA3_8B, 16), (scale_model.LLAMA3_70B, 64)):
        row = scale_model.train_table([m], [gpus], hw, w).splitlines()[-1]
        assert row in doc, row
        steps, forwards = (int(x.replace(",", "")) for x in re.split(r"\s*\|\s*", row)[4:6])
        assert forwards == scale_model.train_plan(w, gpus).forwards and steps <= forwards
