"""What a run shows: rank-0 progress bars and TensorBoard scalars/text.

DeepSpeed's own monitor writes next to ours (``tb/deepspeed``); msl_ds writes ``tb/msl``: loss
parts, lr, grad norm, tokens/s, per-stage metrics and the accuracy matrix (one scalar per cell
plus a Markdown table).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")

_PROGRESS = {"enabled": True}


def set_progress(enabled: bool) -> None:
    _PROGRESS["enabled"] = enabled


def _rank0() -> bool:
    from msl_ds import distributed as D

    return D.is_rank0()


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A tqdm bar on rank 0 (plain iteration elsewhere or when disabled)."""
    if not (_PROGRESS["enabled"] and _rank0()):
        yield from items
        return
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    yield from tqdm(
        items,
        desc=desc,
        total=total,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.5 if interactive else 30.0,
        disable=os.environ.get("MSL_NO_PROGRESS") == "1",
    )


class Monitor:
    """Rank-0 TensorBoard writer (a no-op elsewhere or when disabled)."""

    def __init__(self, log_dir: str | Path, enabled: bool = True):
        self.writer = None
        if enabled and _rank0():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for tag, v in values.items():
            if isinstance(v, (int, float)) and v == v:  # skip NaN
                self.writer.add_scalar(tag, float(v), step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, markdown, step)

    def accuracy_matrix(self, matrix: dict[int, dict[int, float]], step: int) -> None:
        """One scalar per cell, ``acc_matrix/after_stage_i/on_stage_j``."""
        for i, row in matrix.items():
            for j, v in row.items():
                self.scalars({f"acc_matrix/after_{int(i):02d}/on_{int(j):02d}": v}, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
