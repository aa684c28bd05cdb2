"""benchmarks/gpu_checks.sh --dry-run: every step of the one-call GPU script runs on a CPU at tiny
sizes (so the script cannot rot between GPU sessions) and the table it would fill is printed whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.e2e  # ~2 min on 2 cores: a tiny model through every benchmark and a 2-stage msl run

STEPS_RUN = ("loss", "world", "model", "train", "gen", "msl")
ROWS = (
    "Triton kernel tests (pytest -m gpu)",
    "loss kernel fused-linear, V=1024, float32",
    "train msl_ds logits: tokens/s",
    "train msl_ds fused_linear+ckpt: MFU",
    "train msl_ds logits+ckpt: peak GiB",
    "train msl_ds fused_linear: largest micro-batch (est.)",
    "train transformers.Trainer (same JSON): tokens/s",
    "msl_ds fused_linear+ckpt / Trainer tokens/s",
    "largest micro-batch fused_linear / logits",
    "generation (augment phase) gathered: tokens/s",
    "generation (augment phase) synced: tokens/s",
    "2-stage msl run, stage 1: stage seconds",
    "2-stage msl run, stage 2: train answer tokens/s",
    "train on 2 ranks, msl_ds fused_linear+ckpt: tokens/s",
)


def value(table: str, row: str) -> str:
    line = next(ln for ln in table.splitlines() if ln.startswith(f"| {row}"))
    return line.split(" | ")[1]


def test_gpu_checks_dry_run_fills_the_table(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, PYTHONPATH=str(REPO), MSL_NO_PROGRESS="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_checks.sh", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    steps = (tmp_path / "out" / "steps.txt").read_text()
    for name in STEPS_RUN:
        assert f"== {name}: rc=0" in steps, (name, steps, out[-6000:])
    assert "== kernels: skipped, the Triton kernel tests need CUDA" in steps
    table = (tmp_path / "out" / "table.md").read_text()
    assert table in proc.stdout and "DRY RUN" in table
    for row in ROWS:
        assert f"| {row}" in table, row
    # every step that ran filled its numbers; CUDA-only ones are '-'
    for row in ROWS[1:4] + ROWS[6:8] + ROWS[9:13]:
        if "MFU" in row:
            assert value(table, row) == "-"  # no peak FLOP/s for a CPU
        else:
            assert value(table, row) not in ("-", ""), row
    assert value(table, "train msl_ds logits+ckpt: peak GiB") == "-"  # CUDA's peak only
