"""Multi-node behaviour: launcher discovery (SLURM), trusted output dirs, node-local disks.

The fingerprint cases are unit tests on msl_ds.fingerprint; the launch that refuses a changed
method is in tests/test_e2e.py (it reuses that module's reference run). Two localhost "nodes" with
separate output directories: sft in tests/test_e2e.py, msl here (slow: it needs the msl reference).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import BIN, REPO, TINY_CONFIG, assert_same_metrics, free_port, launch_env, msl_args, stable

from msl_ds import distributed as D
from msl_ds.config import load_config
from msl_ds.fingerprint import FILE, check_output_dir, fingerprint, record
from msl_ds.io import write_json

# --------------------------------------------------------------------------- launcher discovery


def test_slurm_node_lists_and_task_counts():
    assert D.first_host("gpu[07-09,12]-ib,cpu1") == "gpu07-ib"
    assert D.first_host("node3,node[1-2]") == "node3"
    assert D.first_host("localhost") == "localhost"
    assert D.slurm_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert D.slurm_tasks_per_node("8") == [8]


def test_slurm_environment_is_translated_and_user_values_win():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NODELIST": "gpu[3-4]", "SLURM_JOB_ID": "4242"}  # fmt: skip
    D._from_slurm(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("5", "8", "1", "4")
    assert env["MASTER_ADDR"] == "gpu3"
    assert env["MASTER_PORT"] == str(D.DEFAULT_MASTER_PORT + 4242 % D.SLURM_PORT_SPREAD)
    mine = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "gpu3", "SLURM_JOB_ID": "7",
            "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "31000", "SLURM_STEP_NUM_TASKS": "4"}  # fmt: skip
    D._from_slurm(mine)
    assert (mine["MASTER_ADDR"], mine["MASTER_PORT"], mine["WORLD_SIZE"]) == ("10.0.0.9", "31000", "4")


@pytest.mark.distributed
def test_slurm_variables_form_one_two_rank_job(tmp_path):
    """Two processes that only have SLURM's variables (as srun sets them) join one 2-rank group."""
    report = tmp_path / "ranks.json"
    port, procs = str(free_port()), []
    for r in (0, 1):
        env = launch_env({"SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                          "SLURM_TASKS_PER_NODE": "2", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
                          "SLURM_JOB_ID": "1", "MASTER_PORT": port})  # fmt: skip
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
            env.pop(key, None)
        procs.append(
            subprocess.Popen([sys.executable, "tests/scripts/slurm_ranks.py", str(report)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )  # fmt: skip
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    got = json.loads(report.read_text())
    assert [(g["rank"], g["world"], g["local_rank"]) for g in got] == [(0, 2, 0), (1, 2, 1)]
    assert {g["addr"] for g in got} == {"localhost"}  # the first host of SLURM_NODELIST


# --------------------------------------------------------------------------- trusted output dirs


@pytest.fixture()
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    return d


def _cfg(world, model, out, *extra):
    return load_config(TINY_CONFIG, [f"data.dir={world}", f"model.path={model}", f"run.output_dir={out}", *extra])


def _claim(out, fp, resume=True):
    """What launch/train.py's rank 0 does on a fresh directory."""
    decision = check_output_dir(out, fp, resume)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text("written by the first launch\n")
    write_json(out / FILE, record(out, fp, decision, "config.yaml"))
    return decision


def test_fingerprint_cases(tiny_world, model_dir, tmp_path):
    out = tmp_path / "run"
    fp = fingerprint(_cfg(tiny_world, model_dir, out), world_size=2)
    assert _claim(out, fp)["fresh"]
    # same config (another output-dir spelling, timeouts, threads, intervals): resumes
    same = fingerprint(
        _cfg(tiny_world, model_dir, out, "run.name=other", "deepspeed.timeout_s=60", "train.log_every_steps=1"), 2
    )
    assert check_output_dir(out, same, True) == {"error": None, "warning": None, "fresh": False, "differs": []}
    # the same global batch on another rank count is the same run
    assert fingerprint(_cfg(tiny_world, model_dir, out, "train.grad_accum=2"), 1) == fp
    g16 = _cfg(tiny_world, model_dir, out, "train.global_batch_size=16", "train.micro_batch_size=4")
    assert fingerprint(g16, 4) == fp  # 16 groups per step = 8 x 1 x 2
    # a changed method: refused, naming run.method
    msl = fingerprint(_cfg(tiny_world, model_dir, out, "run.method=msl"), 2)
    refused = check_output_dir(out, msl, True)
    assert refused["differs"] == ["run.method"] and "run.method" in refused["error"] and not refused["warning"]
    assert "run.resume=force" in refused["error"]
    # run.resume=force: continues, warning with the keys
    forced = check_output_dir(out, msl, "force")
    assert forced["error"] is None and "run.method" in forced["warning"]
    assert record(out, msl, forced, "config.resume-1.yaml")["forced"] == [
        {"differs": ["run.method"], "config": "config.resume-1.yaml"}
    ]
    # run.resume=false on a used directory: refused (a fresh run needs a new run.output_dir)
    assert "run.resume=false" in check_output_dir(out, fp, False)["error"]
    assert check_output_dir(tmp_path / "unused", fp, False)["fresh"]
    # a changed data file or model file is named
    (model_dir / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    moved = fingerprint(_cfg(tiny_world, model_dir, out), 2)
    assert check_output_dir(out, moved, True)["differs"] == ["model.path:config.json"]
    # a run without a fingerprint (older msl_ds) is refused unless forced
    old = tmp_path / "old"
    (old / "stage_01").mkdir(parents=True)
    assert FILE in check_output_dir(old, fp, True)["error"]
    assert check_output_dir(old, fp, "force")["warning"]
    # unrelated files (a launcher's log) do not make a directory a run
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "launch.log").write_text("")
    assert check_output_dir(tmp_path / "logs", fp, False)["fresh"]


# --------------------------------------------------------------------------- node-local disks


@pytest.mark.e2e
@pytest.mark.distributed
@pytest.mark.slow
def test_two_nodes_with_separate_output_dirs_msl(msl_run, tiny_world, tiny_base, tmp_path):
    """Method msl, stages 1-2, one rank per localhost "node", each node with its own output dir
    (as node-local disks would be): the probe records, augmentations and the stage-1 export reach
    node 1 without a shared directory, and the metrics equal the shared-directory run's."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port, procs, t0 = str(free_port()), [], time.time()
    for node in (0, 1):
        out = tmp_path / f"node{node}"
        cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
               "--master_addr", "127.0.0.1", "--master_port", port, "launch/train.py",
               *msl_args(tiny_world, tiny_base, out)]  # fmt: skip
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        )  # fmt: skip
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, o in zip(procs, outputs):
        assert p.returncode == 0, o[-5000:]
    assert "node-local output directories" in outputs[0], outputs[0][-3000:]
    assert_same_metrics(stable(msl_run), stable(tmp_path / "node0"), 2)
    for name in ("probe.jsonl", "augment.jsonl"):
        assert (tmp_path / "node0" / "stage_02" / name).read_text() == (msl_run / "stage_02" / name).read_text()
    node1 = tmp_path / "node1"
    assert (node1 / "stage_01" / "hf" / "model.safetensors").is_file()  # node 1's own copy of π_1
    assert not (node1 / "stage_01" / "probe.jsonl").exists()  # records came over the process group
    assert time.time() - t0 < 900
