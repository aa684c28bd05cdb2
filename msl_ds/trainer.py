"""One stage of full-parameter training on a DeepSpeed engine.

The batch plan is computed identically on every rank (see ``data.batch_plan``), so resuming is
"skip the first ``step`` global batches"; the loss is normalised by the global number of answer
tokens of each optimizer step, so the gradient does not depend on how the batch is split into
micro-batches, accumulation steps and ranks.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from msl_ds import distributed as D
from msl_ds.config import TrainSection
from msl_ds.data import Example, collate, micro_batches
from msl_ds.fault import maybe_fault
from msl_ds.kernels import ROLE_GOLD, LossConfig, preference_loss
from msl_ds.monitor import Monitor, progress

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def lr_lambda(cfg: TrainSection, total_steps: int) -> Callable[[int], float]:
    """Warmup, then constant / linear / cosine decay to ``min_lr_ratio`` of the peak."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.scheduler == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        frac = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.scheduler == "linear":
            decay = 1.0 - frac
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * frac))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay

    return f


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


@dataclass
class StageTrainer:
    """Runs the optimizer steps of one stage; checkpoints through ``save(step)``."""

    engine: Any
    cfg: TrainSection
    examples: list[Example]
    plan: list[list[int]]
    pad_id: int
    stage: int
    monitor: Monitor
    save: Callable[[int], None]
    global_step0: int = 0
    loss_cfg: LossConfig = field(default_factory=LossConfig)
    history: list[dict[str, float]] = field(default_factory=list)

    def run(self, start_step: int = 0) -> dict[str, float]:
        """Train from ``start_step`` to the end of the plan; returns summary statistics."""
        w, r = D.world_size(), D.rank()
        t0, tokens, last_loss = time.time(), 0, float("nan")
        steps = range(start_step, len(self.plan))
        for step in progress(steps, desc=f"stage {self.stage} train", total=len(steps)):
            maybe_fault("train", stage=self.stage, step=step)
            mbs = micro_batches(self.plan[step], self.cfg.micro_batch_size, self.cfg.grad_accum, w, r)
            batch_tokens = sum(self._answer_tokens(i) for i in self.plan[step])
            normaliser = batch_tokens / (w * self.cfg.grad_accum)
            loss_sum = 0.0
            for mb in mbs:
                loss = self._micro_step([self.examples[i] for i in mb], normaliser)
                loss_sum += float(loss)
            total = D.all_reduce_sum([loss_sum])[0] / w  # = global token-mean NLL of the step
            if not math.isfinite(total):
                raise NonFiniteLossError(
                    f"stage {self.stage} step {step}: non-finite loss {total}; the last good checkpoint is left intact"
                )
            self.engine.step()
            tokens += batch_tokens
            last_loss = total
            if (step + 1) % self.cfg.log_every_steps == 0 or step + 1 == len(self.plan):
                self._log(step, total, tokens, time.time() - t0)
            if self.cfg.save_every_steps and (step + 1) % self.cfg.save_every_steps == 0 and step + 1 < len(self.plan):
                self.save(step + 1)
        elapsed = time.time() - t0
        planned = sum(self._answer_tokens(i) for step in self.plan for i in step)  # the same when resumed
        return {
            "train_steps": len(self.plan),
            "train_loss": last_loss,
            "train_tokens": planned,
            "train_seconds": elapsed,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else float("nan"),
        }

    def _answer_tokens(self, i: int) -> int:
        return sum(1 for x in self.examples[i].labels if x != -100)

    def _micro_step(self, examples: list[Example], normaliser: float) -> float:
        batch = {k: v.to(D.device()) for k, v in collate(examples, self.pad_id).items()}
        out = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        labels = batch["labels"]
        roles = torch.full((labels.shape[0],), ROLE_GOLD, dtype=torch.long, device=labels.device)
        ref = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device)
        # the logits feed nothing but this loss, so its backward may overwrite them with their
        # gradient instead of allocating a second [B, T, V] buffer
        loss, _ = preference_loss(
            out.logits,
            labels,
            labels != -100,
            roles,
            ref,
            self.loss_cfg,
            token_normalizer=normaliser,
            inplace_backward=True,
        )
        self.engine.backward(loss)
        # report the un-normalised share of the global mean (what this rank contributed)
        return loss.detach().item() / self.cfg.grad_accum

    def _log(self, step: int, loss: float, tokens: int, elapsed: float) -> None:
        gs = self.global_step0 + step + 1
        lr = self.engine.get_lr()[0] if hasattr(self.engine, "get_lr") else float("nan")
        gn = self.engine.get_global_grad_norm() if hasattr(self.engine, "get_global_grad_norm") else None
        values = {
            "train/loss": loss,
            "train/lr": lr,
            "train/tokens_per_s": tokens / max(elapsed, 1e-9),
            "train/stage": self.stage,
        }
        if gn is not None:
            values["train/grad_norm"] = float(gn)
        self.monitor.scalars(values, gs)
        self.history.append({"step": step + 1, **{k.split("/")[1]: v for k, v in values.items()}})
        log.info("stage %d step %d/%d loss %.4f lr %.2e", self.stage, step + 1, len(self.plan), loss, lr)
