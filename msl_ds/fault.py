"""Fault injection for crash-and-resume tests.

``MSL_FAULT="train:stage=2:step=3:rank=1"`` kills the process (SIGKILL, no cleanup, like a dead
node) when ``maybe_fault("train", stage=2, step=3)`` is reached on rank 1. Keys left out match
anything. Several faults can be given separated by ``;``. Phases: see the calls to
``maybe_fault`` (``probe``, ``augment``, ``train``, ``checkpoint``, ``export``, ``eval``, ``stage_end``).
"""

from __future__ import annotations

import os
import signal


def _parse(spec: str) -> list[tuple[str, dict[str, str]]]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        phase, *conds = item.split(":")
        out.append((phase, dict(c.split("=", 1) for c in conds)))
    return out


def maybe_fault(phase: str, **where: object) -> None:
    spec = os.environ.get("MSL_FAULT")
    if not spec:
        return
    from msl_ds import distributed as D

    here = {k: str(v) for k, v in where.items()}
    here["rank"] = str(D.rank())
    for p, conds in _parse(spec):
        if p == phase and all(here.get(k) == v for k, v in conds.items()):
            os.kill(os.getpid(), signal.SIGKILL)
