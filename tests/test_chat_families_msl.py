"""Method msl end to end on the Llama-3, Qwen2/ChatML and Gemma stand-ins (slow: 2 launches each).

Each family's base is its own tokenizer, chat template and ``generation_config`` end tokens,
trained on the tiny world's stage 0 by ``launch/make_base.py`` (``base.init``); a 2-stage msl run
on 2 ranks must then end its generations (under 20% unfinished in every stage) and accept
augmentations: with a wrong end token every output runs to the cap and augmentation rejects
everything as truncated (the method silently becomes SFT).
"""

from __future__ import annotations

import json

import pytest
from chat_families import FAMILIES, build_model_dir
from conftest import TINY_CONFIG, deepspeed_cmd, msl_args, run

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.distributed]

SIZE = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4}
BASE = ["base.train.max_steps=200"]  # enough to learn the template's turns and the skills' formats
STAGES = ["train.epochs=4", "train.save_every_steps=0"]  # the stages as short as the checks allow


def world_texts(world) -> list[str]:
    from msl_ds.config import load_config
    from msl_ds.data import load_world
    from msl_ds.skills import skill_rows

    w = load_world(world)
    rows = [r for s in w.stages.values() for split in s.values() for r in split] + w.retain + w.general
    rows += skill_rows(list(w.split(0, "train")), load_config(TINY_CONFIG).skills, 0)
    return [r["question"] for r in rows] + [r["answer"] for r in rows]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_msl_run_ends_its_generations(name, tiny_world, tmp_path):
    init = build_model_dir(name, world_texts(tiny_world), tmp_path / "init", vocab_size=1200, **SIZE)
    base = tmp_path / "base"
    cmd = [str(TINY_CONFIG), f"data.dir={tiny_world}", f"base.out_dir={base}", f"base.init={init}", *BASE]
    run(deepspeed_cmd("launch/make_base.py", *cmd), timeout=1800)
    out = tmp_path / "run"
    run(deepspeed_cmd("launch/train.py", *msl_args(tiny_world, base, out, *STAGES)), timeout=1800)
    for t in (1, 2):
        m = json.loads((out / f"stage_{t:02d}" / "metrics.json").read_text())
        assert m["unfinished"] < 0.2, (name, t, {k: v for k, v in m.items() if k.startswith("unfinished")})
        assert m["aug_accepted"] > 0, (name, t, {k: v for k, v in m.items() if k.startswith("aug_")})
