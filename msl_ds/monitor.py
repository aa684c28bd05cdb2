"""What a run shows: rank-0 phase lines and progress bars, TensorBoard scalars/text, a JSON Lines log, W&B.

The console (rank 0): one line when each phase of a stage starts and ends, with its size and
duration (``stage 3/7 · probe · 412 prompts · 38 s``); during training a line every
``train.log_every_steps`` with loss, tokens/s, MFU and the stage's ETA; after every stage its
metrics and the run's ETA; at the end the table, the wall time, the final model and the
TensorBoard command.

DeepSpeed's own monitor writes next to ours (``tb/deepspeed``); msl_ds writes ``tb/msl``: loss
parts, lr, grad norm, tokens/s, per-stage metrics and the accuracy matrix (one scalar per cell
plus a Markdown table). Every scalar also goes, one line per step, to ``tb/msl/metrics.jsonl``
(``{"step", "time", <tag>: value, ...}``; a resumed run appends, so a step logged again after a
kill appears twice: the last line wins) and, with ``monitor.wandb`` set and ``wandb`` installed,
to Weights & Biases.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger("msl_ds")

_PROGRESS = {"enabled": True}


def set_progress(enabled: bool) -> None:
    _PROGRESS["enabled"] = enabled


def _rank0() -> bool:
    from msl_ds import distributed as D

    return D.is_rank0()


def duration(seconds: float) -> str:
    """``38 s``, ``4 min 12 s``, ``2 h 05 min``."""
    if seconds != seconds or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


@contextlib.contextmanager
def phase(label: str, name: str, size: str = "") -> Iterator[dict[str, str]]:
    """Log ``<label> · <name> · <size> · started`` and, at the end, ``... · <size> · <duration>``.

    The block may set ``info["size"]`` to what it found out (``"40 generated, 31 accepted"``).
    """
    info = {"size": size}
    log.info("%s · %s%s · started", label, name, f" · {size}" if size else "")
    t0 = time.time()
    yield info
    log.info("%s · %s%s · %s", label, name, f" · {info['size']}" if info["size"] else "", duration(time.time() - t0))


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
    """Rank-0 TensorBoard writer, ``metrics.jsonl`` and W&B (each a no-op elsewhere or when disabled)."""

    def __init__(
        self,
        log_dir: str | Path,
        enabled: bool = True,
        jsonl: bool = False,
        wandb_project: str | None = None,
        run_name: str = "",
        config: dict[str, Any] | None = None,
    ):
        self.writer = None
        self.jsonl = None
        self.wandb = None
        if not _rank0():
            return
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))
        if jsonl:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(log_dir) / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if wandb_project:
            try:
                import wandb
            except ImportError:
                logging.getLogger(__name__).warning(
                    "monitor.wandb=%s but wandb is not installed (pip install 'msl_ds[wandb]'): not logging to W&B",
                    wandb_project,
                )
            else:
                self.wandb = wandb.init(project=wandb_project, name=run_name or None, config=config, dir=str(log_dir))

    def scalars(self, values: dict[str, Any], step: int) -> None:
        finite = {t: float(v) for t, v in values.items() if isinstance(v, (int, float)) and v == v}  # skip NaN/None
        if not finite:
            return
        if self.writer is not None:
            for tag, v in finite.items():
                self.writer.add_scalar(tag, v, step)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **finite}) + "\n")
        if self.wandb is not None:
            self.wandb.log(finite, step=step)

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
        if self.jsonl is not None:
            self.jsonl.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
