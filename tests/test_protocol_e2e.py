"""docs/PROTOCOL.md end to end on the tiny world (2 ranks, one short stage each): method ``msl`` with
the shipped defaults, the α = β = 0 control against sft bit for bit, and msl_replay's share."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from conftest import REPO, TINY_CONFIG, deepspeed_cmd, run

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]


def _args(world: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(TINY_CONFIG), f"data.dir={world}", f"model.path={base}", f"run.output_dir={out}", "data.stages=[1]",
        *extra,
    ]  # fmt: skip


def _rescore_tool():
    spec = importlib.util.spec_from_file_location("rescore_tool", REPO / "tools" / "rescore.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_msl_with_the_shipped_defaults(tiny_world, tiny_base, tmp_path):
    """run.method=msl and nothing else of the method set: the defaults as shipped."""
    from msl_ds.config import load_config
    from msl_ds.provenance import code_commit

    out = tmp_path / "msl_default"
    args = _args(tiny_world, tiny_base, out, "run.method=msl", "data.eval_limit=24")
    run(deepspeed_cmd("launch/train.py", *args))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["effective_config"] == load_config(args[0], args[1:]).to_dict()
    assert summary["commit"]["commit"] == code_commit()["commit"]
    m = json.loads((out / "stage_01" / "metrics.json").read_text())
    # the rehearsal schedule (rehearsal_every 1): every subject of stage 0 that stage 1 does not
    # train, the arithmetic pseudo-subjects included, and coverage 1.00
    stage0 = {r["subject"] for r in _jsonl(tiny_world / "stage_00" / "train.jsonl")}
    mine = {r["subject"] for r in _jsonl(tiny_world / "stage_01" / "train.jsonl")}
    assert m["rehearsal_subjects"] == len(stage0 - mine) and m["rehearsal_pseudo_subjects"] == 20
    assert m["rehearsal_subject_coverage"] == 1.0 and m["rehearsal_window_coverage"] == 1.0
    records = _jsonl(out / "stage_01" / "augment.jsonl")
    rehearsed = {r["subject"]: r for r in records if r["kind"] == "rehearsal"}
    assert set(rehearsed) == stage0 | mine
    assert all(r["pseudo"] == bool(re.fullmatch(r"\d+\+\d+", s)) for s, r in rehearsed.items())
    # the general probe: held-out items, never rehearsed
    evals = _jsonl(out / "stage_01" / "eval.jsonl")
    general = [r for r in evals if r["set"] == "general"]
    assert general and all(r["id"].startswith("general/gp") for r in general)
    probe_items = {r["subject"] for r in _jsonl(tiny_world / "general.jsonl")}
    assert probe_items and probe_items.isdisjoint(rehearsed)
    # PBL as shipped: L_PP trains (α = 0.1), L_NP does not (β = 0), margins reported
    assert m["train_loss"] == m["train_loss"] and "margin_aligned" in m and m["probe_aligned"] > 0
    # acc_world and general recomputed by hand from the answers and the world files
    tool = _rescore_tool()
    value, facts = tool.acc_world(tiny_world, evals, [1], "test")
    assert value == pytest.approx(m["acc_world"], abs=1e-12) and facts == m["acc_world_facts"]
    gold = {r["id"]: r["answer"] for r in _jsonl(tiny_world / "general.jsonl")}
    right = [gold[r["id"]].lower() in r["output"].lower() for r in general]
    assert m["general"] == pytest.approx(sum(right) / len(right), abs=1e-12)


def _losses(out: Path) -> list[float]:
    return [r["train/loss"] for r in _jsonl(out / "tb" / "msl" / "metrics.jsonl") if "train/loss" in r]


def test_zero_preference_weights_train_exactly_like_sft(tiny_world, tiny_base, tmp_path):
    """msl with α = β = 0 and no augmentation is sft, bit for bit: the probe still runs and is
    reported, but no candidate joins a step (msl_ds.recipe), so every batch and every float is
    sft's: the same per-step losses and the same answers."""
    common = ["train.max_steps=3", "train.log_every_steps=1", "data.eval_limit=16", "deepspeed.threads_per_rank=1"]
    sft, ctl = tmp_path / "sft", tmp_path / "control"
    run(deepspeed_cmd("launch/train.py", *_args(tiny_world, tiny_base, sft, "run.method=sft", *common)))
    zero = ["run.method=msl", "pbl.pp_weight=0", "pbl.np_weight=0", "augment.enabled=false"]
    run(deepspeed_cmd("launch/train.py", *_args(tiny_world, tiny_base, ctl, *zero, *common)))
    a, b = (json.loads((d / "stage_01" / "metrics.json").read_text()) for d in (sft, ctl))
    assert b["probe_known"] + b["probe_conflict"] + b["probe_unknown"] > 0  # the probe ran
    assert len(_losses(sft)) == 3 and _losses(sft) == _losses(ctl)  # == on floats: bit for bit
    assert a["train_loss"] == b["train_loss"] and a["train_rows"] == b["train_rows"]
    outputs = [[(r["set"], r["id"], r["output"]) for r in _jsonl(d / "stage_01" / "eval.jsonl")] for d in (sft, ctl)]
    assert outputs[0] == outputs[1]


@pytest.mark.slow
def test_msl_replay_holds_the_stated_share(tiny_world, tiny_base, tmp_path):
    """msl_replay: true earlier rows next to msl's, their common weight set so they carry
    replay.weight of the stage's weighted answer tokens (recomputed here from the rows)."""
    from msl_ds.data import encode_rows, load_world, replay_rows
    from msl_ds.modeling import load_tokenizer

    out = tmp_path / "msl_replay"
    extra = ["run.method=msl", "replay.in_msl=true", "replay.weight=0.5", "train.max_steps=2", "data.eval_limit=8"]
    run(deepspeed_cmd("launch/train.py", *_args(tiny_world, tiny_base, out, *extra)))
    m = json.loads((out / "stage_01" / "metrics.json").read_text())
    world = load_world(tiny_world, ("train", "test"))
    stage = world.split(1, "train")
    replayed = replay_rows(world, 1, len(stage), 0, 0)
    assert m["replay_rows"] == len(replayed) > 0
    tok = load_tokenizer(tiny_base)
    accepted = [r for r in _jsonl(out / "stage_01" / "augment.jsonl") if r["accepted"]]
    pseudo = {r["id"] for r in accepted if r.get("pseudo")}

    def tokens(rows):
        return [sum(t != -100 for t in x.labels) for x in encode_rows(tok, rows, 96, "truncate", "t")]

    others = sum(tokens(stage))
    for r, n in zip(accepted, tokens(accepted)):
        others += n * (0.2 if r["id"] in pseudo else 1.0)
    mine = sum(tokens(replayed))
    assert m["replay_row_weight"] == pytest.approx(0.5 * others / (0.5 * mine), rel=1e-9)
