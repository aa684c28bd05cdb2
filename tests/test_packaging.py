"""A wheel built from the repository, installed in a fresh venv: the shipped configs and commands work.

The fresh venv borrows this venv's dependencies through a ``.pth`` file (no download of torch);
msl_ds itself comes only from the wheel, and the commands run from a directory with no checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv

import pytest
from conftest import REPO

pytestmark = pytest.mark.e2e


def test_wheel_installs_commands_and_configs(tiny_world, tiny_base, tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    (wheel,) = wheels.glob("msl_ds-*.whl")
    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    deps = sysconfig.get_paths()["purelib"]  # this venv's packages, minus its msl_ds (see below)
    with open(os.path.join(site, "deps.pth"), "w") as f:
        f.write(deps + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=600)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # the installed package, not the checkout or this venv's editable install
    where = subprocess.run(
        [str(py), "-c", "import msl_ds, msl_ds.config as c; print(msl_ds.__file__); print(c.CONFIG_DIR)"],
        cwd=cwd, env=env, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert where[0].startswith(site) and where[1] == os.path.join(site, "msl_ds", "ds_configs"), where
    proc = subprocess.run(
        [str(env_dir / "bin" / "msl-train"), "run_cpu_tiny.yaml", "--check", f"data.dir={tiny_world}",
         f"model.path={tiny_base}"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check passed" in proc.stdout and os.path.join("ds_configs", "run_cpu_tiny.yaml") in proc.stdout
    for cmd in ("msl-make-world", "msl-compare", "msl-make-base", "msl-import-model"):
        assert (env_dir / "bin" / cmd).is_file(), cmd
    # msl_ds.models (a sub-package) travels in the wheel
    proc = subprocess.run(
        [str(env_dir / "bin" / "msl-import-model"), "--help"], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "GGUF" in proc.stdout, proc.stdout + proc.stderr
