"""Shared fixtures: the tiny world, a tiny base model built by the real builder, launch helpers."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY_CONFIG = REPO / "ds_configs" / "run_cpu_tiny.yaml"
# in-process DeepSpeed (and every launch below) finds the venv's ninja, the one `make setup` built
# DeepSpeed's op with: another ninja cannot read its build log and rebuilds the op (~1 min)
os.environ["PATH"] = f"{BIN}:{os.environ.get('PATH', '')}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env["MSL_NO_PROGRESS"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.pop("MSL_FAULT", None)
    env.update(extra or {})
    return env


def run(
    cmd: list[str], env: dict[str, str] | None = None, timeout: int = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a launcher command from the repo root; show the output's tail when it fails."""
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    left = leaked_shm(cmd)
    assert not left, f"launch left DeepSpeed shm segments in /dev/shm: {left}"
    return proc


def leaked_shm(cmd: list[str]) -> list[str]:
    """DeepSpeed's CPU all-reduce segments a finished (or killed) launch left behind in /dev/shm."""
    if "--master_port" not in cmd or not os.path.isdir("/dev/shm"):
        return []
    port = cmd[cmd.index("--master_port") + 1]
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in n)


def deepspeed_cmd(script: str, *args: str, nproc: int = 2) -> list[str]:
    """The DeepSpeed launcher as a module of this interpreter: the same as the ``deepspeed`` script,
    and it also works where DeepSpeed was installed without one on PATH (``pip --target``)."""
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [*launcher, "--num_gpus", str(nproc), "--master_port", str(free_port()), script, *args]


def too_few_gpus(nproc: int = 2) -> bool:
    """On a CUDA box each rank binds the GPU of its local rank: fewer GPUs than ranks cannot run."""
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() < nproc


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    from msl_ds.world import generate_world, write_world

    out = tmp_path_factory.mktemp("world") / "world_tiny"
    write_world(generate_world("tiny", seed=0), out)
    return out


@pytest.fixture(scope="session")
def tiny_base(tiny_world, tmp_path_factory) -> Path:
    """The tiny base model, built once per session by launch/make_base.py on 2 ranks."""
    out = tmp_path_factory.mktemp("base") / "base_tiny"
    run(
        deepspeed_cmd("launch/make_base.py", str(TINY_CONFIG), f"data.dir={tiny_world}", f"base.out_dir={out}"),
        timeout=900,
    )
    return out


# one thread per rank: every launch of the same msl run must sum floats in the same order
# the msl run of the tests also exercises L_NP, per-row loss normalisation and the consistent-rehearsal
# filter (all off by default); PBL aimed at the stale belief is the default
MSL_COMMON = [
    "deepspeed.threads_per_rank=1",
    "pbl.embedder=minilm",
    "pbl.np_weight=0.1",
    "train.loss_norm=row",
    "augment.rehearsal_samples=4",
]


def msl_args(world: Path, base: Path, out: Path, *extra: str) -> list[str]:
    """Method msl on stages 1-2 of the tiny world (the reference run and its fault-matrix twin)."""
    return [
        str(TINY_CONFIG),
        f"data.dir={world}",
        f"model.path={base}",
        f"run.output_dir={out}",
        "run.method=msl",
        "data.stages=[1,2]",
        "data.eval_limit=40",
        "train.log_every_steps=2",
        "train.save_every_steps=2",
        *MSL_COMMON,
        *extra,
    ]


@pytest.fixture(scope="session")
def msl_run(tiny_world, tiny_base, tmp_path_factory) -> Path:
    """One uninterrupted method-msl run (probe, augmentation, PBL) on 2 ranks."""
    out = tmp_path_factory.mktemp("runs") / "msl"
    run(deepspeed_cmd("launch/train.py", *msl_args(tiny_world, tiny_base, out)))
    return out


TIMING = {"train_seconds", "answer_tokens_per_s", "stage_seconds"}
TIMING_PREFIXES = ("gen_tokens_per_s_",)  # generation tokens/s per phase


def stable(out: Path) -> list[dict]:
    """Every stage's metrics without wall-clock fields."""
    return [
        {k: v for k, v in json.loads(p.read_text()).items() if k not in TIMING and not k.startswith(TIMING_PREFIXES)}
        for p in sorted(out.glob("stage_*/metrics.json"))
    ]


def assert_same_metrics(a: list[dict], b: list[dict], stages: int) -> None:
    """Two runs' stage metrics agree: integers and strings exactly, floats to rel 1e-5."""
    assert len(a) == len(b) == stages
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float) and math.isnan(x[k]):
                assert math.isnan(y[k]), k
            elif isinstance(x[k], float):
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (x["stage"], k)
            else:
                assert x[k] == y[k], (x["stage"], k)
