"""What a run's JSON records about how it was made: the effective configuration and the code's commit.

A run's overrides say what differed from the defaults *of the day*; a later default change would
silently change what they mean. So every run JSON (the run's ``summary.json``, msl-compare's
``scores.json``, ``summary.json`` and published per-run files) carries

* ``effective_config``: every key of the typed config after the file, its ``extends`` chain and
  the overrides were applied (``RunConfig.to_dict()``), and
* ``commit``: ``{"commit": <git sha or None>, "dirty": <bool or None>, "source": <why>}`` for the
  code that ran: the git checkout msl_ds was imported from, ``dirty`` when tracked files differ
  from that commit (untracked files are not counted). An install from a wheel or sdist has no
  checkout: ``commit`` and ``dirty`` are None and ``source`` says so, with the package version.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def code_commit(where: str | Path | None = None) -> dict[str, Any]:
    """The git commit of the checkout rooted at ``where`` (default: the directory holding msl_ds/) and a
    dirty flag; None for both when ``where`` is not the top of a git checkout."""
    cwd = Path(where) if where is not None else PACKAGE_DIR.parent
    top = _git(["rev-parse", "--show-toplevel"], cwd) if cwd.is_dir() else None
    # the package must be the checkout's own msl_ds/ (a wheel installed into a venv that happens to
    # sit inside some git repository is not that repository's code)
    if top is None or Path(top).resolve() != cwd.resolve():
        return {"commit": None, "dirty": None, "version": _version(), "source": f"not a git checkout: {cwd}"}
    sha = _git(["rev-parse", "HEAD"], cwd)
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    dirty = None if status is None else bool(status)
    return {"commit": sha, "dirty": dirty, "version": _version(), "source": f"git checkout {top}"}


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("msl_ds")
    except PackageNotFoundError:
        return None


def run_record(cfg) -> dict[str, Any]:
    """``{"effective_config": ..., "commit": ...}`` for a run made with ``cfg`` (a RunConfig)."""
    return {"effective_config": cfg.to_dict(), "commit": code_commit()}
