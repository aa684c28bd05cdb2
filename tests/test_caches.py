"""Cached artifacts are trusted only when they were built from what the run would build them from."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from conftest import REPO, TINY_CONFIG

from msl_ds.base import build_source
from msl_ds.config import load_config


def make_world(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "launch/make_world.py", *args], cwd=REPO, capture_output=True, text=True, check=True
    )
    return proc.stdout


def test_make_world_update_keeps_the_same_world_and_replaces_another(tmp_path):
    out = tmp_path / "w"
    assert "-> " in make_world("--out", str(out), "--size", "tiny", "--update")  # written
    before = (out / "world.json").read_bytes()
    assert "world up to date" in make_world("--out", str(out), "--size", "tiny", "--update")
    assert (out / "world.json").read_bytes() == before
    with open(out / "stage_01" / "train.jsonl", "a") as f:  # an older generator's rows, say
        f.write('{"question": "q?", "answer": "a"}\n')
    assert "replacing it" in make_world("--out", str(out), "--size", "tiny", "--update")
    assert (out / "world.json").read_bytes() == before
    assert "q?" not in (out / "stage_01" / "train.jsonl").read_text()


def test_base_source_changes_with_stage0_and_with_base_settings(tiny_world, tmp_path):
    import shutil

    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    cfg = load_config(str(TINY_CONFIG), [f"data.dir={world}"])
    src = build_source(cfg)
    assert build_source(cfg) == src
    steps = dataclasses.replace(cfg.base, train=dataclasses.replace(cfg.base.train, max_steps=7))
    assert build_source(dataclasses.replace(cfg, base=steps))["settings"] != src["settings"]
    with open(world / "stage_00" / "train.jsonl", "a") as f:
        f.write('{"question": "q?", "answer": "a"}\n')
    assert build_source(cfg)["world"] != src["world"]
    (world / "stage_01" / "train.jsonl").write_text("")  # a later stage is not the base's business
    changed = build_source(cfg)
    assert changed["world"] != src["world"] and build_source(cfg) == changed
