"""Building a stage's engine and keeping its checkpoints safe.

Each stage starts a fresh engine (fresh optimizer and LR schedule) from the previous stage's
Hugging Face export, which is also exactly what a resumed run starts from. Mid-stage
checkpoints are DeepSpeed checkpoints whose pointer (``LATEST.json``) msl_ds advances itself,
atomically and only after every rank has finished writing: DeepSpeed's own ``latest`` file is
written non-atomically and would point at a half-written tag after a crash.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from msl_ds import distributed as D
from msl_ds.config import RunConfig, TrainSection
from msl_ds.fault import maybe_fault
from msl_ds.io import marker_ok, read_json, write_json
from msl_ds.modeling import load_model
from msl_ds.trainer import lr_lambda

log = logging.getLogger(__name__)


def build_engine(cfg: RunConfig, ds_config: dict[str, Any], model_path: str | Path, total_steps: int = 1):
    """Load ``model_path`` partitioned as it loads and wrap it in a DeepSpeed engine.

    Returns ``(engine, pad_token_id)``. The stage's length may only be known after the engine
    has generated (augmentation): :func:`set_total_steps` fixes the schedule before training.
    """
    model, pad = load_model(
        model_path,
        ds_config,
        cfg.model.dtype,
        cfg.model.trust_remote_code,
        max_seq_len=cfg.data.max_seq_len,
        attn_implementation=cfg.model.attn_implementation,
    )
    t = cfg.train
    if t.gradient_checkpointing:
        # transformers' own, non-reentrant: recomputation re-enters ZeRO-3's module hooks, which
        # gather each layer's parameters again in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        log.info("gradient checkpointing on (non-reentrant)")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = D.make_optimizer(params, ds_config, t.lr, t.betas, t.eps, t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t, total_steps))
    engine = D.initialize(model, opt, sched, ds_config)
    engine.train()
    return engine, pad


def set_total_steps(engine, train: TrainSection, total_steps: int) -> None:
    """Re-plan the LR schedule for ``total_steps`` (before the first step, or a checkpoint load)."""
    sched = engine.lr_scheduler
    if sched.last_epoch != 0:
        raise RuntimeError("set_total_steps: the schedule has already stepped")
    sched.lr_lambdas = [lr_lambda(train, total_steps)] * len(sched.lr_lambdas)
    for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(0)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


def stage_done(stage_dir: str | Path) -> bool:
    """Whether ``stage_dir``'s marker vouches for its files: checked on rank 0 only (the files are
    read once, not once per rank), the verdict broadcast so that every rank decides alike."""
    ok = marker_ok(stage_dir) if D.is_rank0() else None
    return bool(D.broadcast_object(ok))


class CheckpointWorldSizeError(RuntimeError):
    """A mid-stage checkpoint written by a different number of ranks."""


class Checkpoints:
    """A stage's DeepSpeed checkpoints under ``root`` with an atomic pointer."""

    POINTER = "LATEST.json"

    def __init__(self, root: str | Path, stage: int):
        self.root = Path(root)
        self.stage = stage

    def latest(self) -> dict[str, Any] | None:
        """The pointer as rank 0 reads it, on every rank (ranks never branch on their own disk)."""
        return D.rank0_decides(self._latest)

    def _latest(self) -> dict[str, Any] | None:
        p = self.root / self.POINTER
        if not p.is_file():
            return None
        info = read_json(p)
        return info if (self.root / info["tag"]).is_dir() else None

    def save(self, engine, step: int, client_state: dict[str, Any]) -> None:
        tag = f"step_{step:06d}"
        shape = {"world_size": D.world_size(), "train_batch_size": D.global_batch(engine)}
        D.save_checkpoint(engine, str(self.root), tag, {**client_state, "step": step, **shape})
        maybe_fault("checkpoint", stage=self.stage, step=step)
        D.barrier()  # every rank's shard is on disk before the pointer moves
        if D.is_writer():  # rank 0; on node-local disks each node's local rank 0
            write_json(self.root / self.POINTER, {"tag": tag, "step": step, **shape})
            for old in self.root.iterdir():  # only now is the previous checkpoint redundant
                if old.is_dir() and old.name.startswith("step_") and old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        D.barrier()

    def discard(self) -> None:
        """Delete the stage's checkpoints (rank 0; every rank waits): call only once the stage's
        export and marker are written, when nothing can resume from them any more."""
        if D.is_rank0() and self.root.exists():
            shutil.rmtree(self.root)
        D.barrier()

    def load(self, engine) -> dict[str, Any] | None:
        """The latest checkpoint's client state (``None`` when there is none).

        A checkpoint written by another number of ranks is refused before DeepSpeed sees it,
        unless it was converted to a universal checkpoint (``<tag>_universal``, see
        :meth:`world_size_error`), which loads on any number of ranks.
        """
        info = self.latest()
        if info is None:
            return None
        universal = self.check_world_size()
        if universal is None:
            return D.load_checkpoint(engine, str(self.root), info["tag"])
        want, have = info.get("train_batch_size"), D.global_batch(engine)
        if want is not None and have is not None and want != have:
            raise CheckpointWorldSizeError(
                f"{universal}: stage {self.stage} was planned with {want} rows per optimizer step, but this run "
                f"has {have}; set train.global_batch_size={want} (the same on any number of ranks)"
            )
        return D.load_checkpoint(engine, str(self.root), universal.name, universal=True)

    def check_world_size(self) -> Path | None:
        """Refuse a latest checkpoint from another world size early (no engine needed).

        Returns its universal conversion when that is what must be loaded, else ``None``.
        """
        info = self.latest()
        if info is None:
            return None
        saved = info.get("world_size") or self._shards(info["tag"])
        if saved is None or saved == D.world_size():
            return None
        universal = self.root / f"{info['tag']}_universal"
        if not (universal / "zero").is_dir():
            raise CheckpointWorldSizeError(self.world_size_error(info["tag"], saved, info.get("train_batch_size")))
        return universal

    def world_size_error(self, tag: str, saved: int, batch: int | None) -> str:
        ckpt = self.root / tag
        keep = f"the same global batch ({batch} rows: " if batch else "the same global batch ("
        return (
            f"{ckpt}: this mid-stage checkpoint of stage {self.stage} was written by {saved} ranks, but this run "
            f"has {D.world_size()}; a ZeRO checkpoint holds one shard per rank and cannot be loaded as is. "
            f"Either\n"
            f"  1. finish stage {self.stage} on {saved} ranks (later stages may use any number: each starts "
            f"from the previous stage's Hugging Face export), or\n"
            f"  2. delete {self.root} to restart stage {self.stage} from the previous stage's export on "
            f"{D.world_size()} ranks (its steps so far are lost), or\n"
            f"  3. convert it to a DeepSpeed universal checkpoint, which loads on any number of ranks, and "
            f"relaunch with {keep}train.global_batch_size keeps it on any number of ranks):\n"
            f"     python -m deepspeed.checkpoint.ds_to_universal --input_folder {ckpt} "
            f"--output_folder {ckpt}_universal"
        )

    def _shards(self, tag: str) -> int | None:
        """Ranks that wrote ``tag`` (checkpoints from before LATEST.json held the world size)."""
        n = len(list((self.root / tag).glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt")))  # ZeRO 1-3
        return n or None
