"""A rank that never joins a collective fails the run within deepspeed.timeout_s, and says so."""

from __future__ import annotations

import sys
import time

import pytest
from conftest import free_port, run

pytestmark = pytest.mark.distributed


def test_hung_collective_times_out_with_a_clear_message():
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "tests/scripts/hang_collective.py",
        "deepspeed.timeout_s=3",
    ]
    t0 = time.monotonic()
    proc = run(cmd, timeout=120, check=False)
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert elapsed < 60, f"took {elapsed:.0f} s"
    want = "CollectiveTimeout: all_reduce_sum on rank 0 of 2 timed out after deepspeed.timeout_s=3 s"
    assert want in out, out[-3000:]
    assert "another rank never joined it" in out
