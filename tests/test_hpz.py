"""ZeRO++ hpZ for two nodes: ``zero_hpz_partition_size: 2`` on 4 CPU ranks (2 "nodes" of 2) trains
and resumes exactly as plain ZeRO-3 (tests/scripts/zero3_hpz.py, which spawns the 4 ranks); and a
second engine in the same process (one per stage) shares hpZ's process groups. MiCS is refused by
DeepSpeed itself."""

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


@pytest.mark.distributed
@pytest.mark.slow  # 4 ranks, 8 engines of a tiny Llama: ~1.5 min on 2 cores
def test_hpz2_on_two_nodes_of_two_equals_plain_zero3_and_resumes():
    script = os.path.join(os.path.dirname(__file__), "scripts", "zero3_hpz.py")
    env = dict(os.environ, PYTHONWARNINGS="ignore", MSL_NO_PROGRESS="1")
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    print(out[-8000:])
    assert proc.returncode == 0, out[-8000:]
    assert "[rank 0] hpz2 fp32: ok" in proc.stdout and "HPZ OK" in proc.stdout


def test_mics_is_refused_by_deepspeed():
    """docs/SCALE.md says MiCS is not an option: the installed DeepSpeed refuses its key outright."""
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError

    with pytest.raises(DeepSpeedConfigError, match="MiCS ZeRO-3 sharding has been removed"):
        DeepSpeedConfig({"train_batch_size": 2, "zero_optimization": {"stage": 3, "mics_shard_size": 2}})
