"""One stage of full-parameter training on a DeepSpeed engine.

The batch plan is computed identically on every rank (see ``data.batch_plan``), so resuming is
"skip the first ``step`` global batches"; the loss is normalised by the global number of answer
tokens (or, with ``train.loss_norm: row``, of gold rows, each row's NLL a mean over its own
tokens) of each optimizer step, so the gradient does not depend on how the batch is split into
micro-batches, accumulation steps and ranks. Examples may be groups (a gold answer with probed
candidates, method ``msl``): a micro-batch of groups is flattened into rows, and each preference
term is rescaled by its rows' share of the step's global count, so it too is a global mean.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from msl_ds import distributed as D
from msl_ds.batching import filler, rank_forwards
from msl_ds.config import BatchShape, ConfigError, TrainSection, batch_shape
from msl_ds.data import Example, collate, flatten
from msl_ds.fault import maybe_fault
from msl_ds.kernels import ROLE_ALIGNED, ROLE_CONFLICT, WEIGHT_FIELD, LossConfig, preference_loss_from_logps
from msl_ds.logprobs import AnswerLogprobs
from msl_ds.monitor import Monitor, duration, progress
from msl_ds.packing import collate_packed, packing_unsupported_model
from msl_ds.telemetry import Throughput

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


# preference terms, with the count their per-micro-batch mean is taken over
TERMS = {"pp": "aligned", "np": "conflict", "dpo": "pairs", "ipo": "pairs", "hinge": "pairs"}
# what one step accumulates across micro-batches and ranks (margin sums and row counts, term sums)
TALLY = ("loss", "r_aligned", "aligned", "r_conflict", "conflict", "pairs", *(f"loss_{t}" for t in TERMS))
# processed positions (rows x padded length), non-padding positions, and positions x padded length
TOKENS = ("tok_all", "tok_real", "tok_seq")


def group_counts(groups: list[Example]) -> dict[str, int]:
    """Aligned rows, conflicting rows and (gold, conflict) pairs in ``groups``."""
    rows, chosen, _ = flatten(groups)
    return {
        "aligned": sum(r.role == ROLE_ALIGNED for r in rows),
        "conflict": sum(r.role == ROLE_CONFLICT for r in rows),
        "pairs": len(chosen),
    }


def scaled_loss_config(cfg: LossConfig, local: dict[str, int], total: dict[str, int], scale: float) -> LossConfig:
    """Per-micro-batch weights that turn the kernel's local means into the step's global means.

    The kernel averages each preference term over the micro-batch's own rows; weighting it by
    local/global count (times ``scale`` = ranks x accumulation, which the engine divides back out)
    gives the same gradient however the step's groups are split.
    """
    if not any(cfg.weight(t) for t in TERMS):
        return cfg
    w = {WEIGHT_FIELD[t]: cfg.weight(t) * local[c] / total[c] * scale if total[c] else 0.0 for t, c in TERMS.items()}
    return dataclasses.replace(cfg, **w)


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
    _window: list[dict[str, float]] = field(default_factory=list)
    _logprobs: AnswerLogprobs | None = None
    peak_tflops: float = 0.0  # monitor.peak_tflops (0: the device table)
    _throughput: Throughput | None = None
    _t_log: float = 0.0
    label: str = ""  # how the console names the stage ("stage 3/7"); "stage <stage>" when empty
    _start: int = 0
    _shape: BatchShape | None = None

    @property
    def logprobs(self) -> AnswerLogprobs:
        """The answer log-prob path of ``train.logprobs`` (built on first use)."""
        if self._logprobs is None:
            if self.cfg.packing:  # the config check read the model dir; this is the model that runs
                why = packing_unsupported_model(self.engine.module)
                if why:
                    raise ConfigError(f"train.packing=true: {why}; set train.packing=false")
            self._logprobs = AnswerLogprobs(self.engine, self.cfg.logprobs)
        return self._logprobs

    def run(self, start_step: int = 0) -> dict[str, float]:
        """Train from ``start_step`` to the end of the plan; returns summary statistics."""
        w, r = D.world_size(), D.rank()
        t0, tokens, last_loss, skipped = time.time(), 0, float("nan"), 0
        last: list[dict[str, float]] = []  # the final step's tally: its margins go to the stage metrics
        steps = range(start_step, len(self.plan))
        self._throughput = Throughput.for_model(self.engine.module, w, self.peak_tflops)
        self._t_log = time.time()
        self._start = start_step
        self.label = self.label or f"stage {self.stage}"
        self._shape = shape = batch_shape(self.cfg, w)
        for step in progress(steps, desc=f"stage {self.stage} train", total=len(steps)):
            maybe_fault("train", stage=self.stage, step=step)
            mbs = rank_forwards(self.plan[step], shape, w, r, self.examples, self.cfg.packing)
            batch_tokens = sum(self._answer_tokens(i) for i in self.plan[step])
            # the SFT term's global normaliser: gold tokens, or gold rows under norm "row"
            units = len(self.plan[step]) if self.loss_cfg.loss_norm == "row" else batch_tokens
            normaliser = units / (w * shape.accum)  # DeepSpeed divides each backward's loss by accum
            counts = group_counts([self.examples[i] for i in self.plan[step]])
            tally = dict.fromkeys(TALLY + TOKENS, 0.0)
            for k, mb in enumerate(mbs):
                # one engine.step() per global batch: tell DeepSpeed which backward closes the
                # accumulation window (its own micro-step count would apply only every
                # grad_accum-th step() call)
                D.set_accumulation_boundary(self.engine, k + 1 == len(mbs))
                fill = mb is None  # a filler forward (token budgets: every rank runs as many)
                if fill:
                    mb = filler(mbs, self.examples, self.cfg.packing)
                for name, v in self._micro_step([self.examples[i] for i in mb], normaliser, counts, fill).items():
                    tally[name] += v
            keys = TALLY + TOKENS
            tally = dict(zip(keys, D.all_reduce_sum([tally[k] for k in keys])))
            self._throughput.add(tally["tok_all"], tally["tok_real"], tally["tok_seq"] / max(tally["tok_all"], 1.0))
            self._throughput.steps += 1
            total = tally["loss"] / w  # = global token-mean NLL of the step (+ preference terms)
            if not math.isfinite(total) and self.cfg.on_nonfinite == "error":
                raise NonFiniteLossError(self._nonfinite_message(step, f"non-finite loss {total}"))
            self.engine.step()
            if self._step_applied(step, total):
                tokens += batch_tokens
                last_loss, last = total, [tally]
                self._window.append(tally)
            else:
                skipped += 1
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
            # gold answer tokens (the loss's) per second; the console's tok/s counts every processed position
            "answer_tokens_per_s": tokens / elapsed if elapsed > 0 else float("nan"),
            # DeepSpeed's count survives a resume (it is in the checkpoint); ours is the fallback
            "train_skipped_steps": D.skipped_steps(self.engine, skipped),
            **self._pbl_values(last, prefix=""),
        }

    def _nonfinite_message(self, step: int, what: str) -> str:
        return (
            f"stage {self.stage} step {step}: {what}; the last good checkpoint is left intact "
            f"(train.on_nonfinite=skip drops such steps instead)"
        )

    def _step_applied(self, step: int, total: float) -> bool:
        """Whether ``engine.step()`` updated the weights; raises or warns per ``train.on_nonfinite``.

        DeepSpeed's ZeRO optimizers skip the update themselves when the global gradient norm is
        not finite: they zero the gradients, hold the LR schedule and count the step in
        ``engine.skipped_steps``, identically on every rank (the norm is all-reduced). In skip
        mode a non-finite loss has already poisoned the gradient (``_micro_step``), so it takes
        the same path.
        """
        finite = math.isfinite(total)
        if D.step_applied(self.engine):
            norm = D.grad_norm(self.engine)
            if not finite or (norm is not None and not math.isfinite(norm)):
                raise NonFiniteLossError(
                    self._nonfinite_message(step, f"loss {total}, gradient norm {norm}")
                    + ", but the optimizer applied the step (only ZeRO stages 1-3 skip it); stopping"
                )
            return True
        if finite and D.fp16_enabled(self.engine):  # dynamic loss scaling found an overflow: routine
            log.info("stage %d step %d: fp16 overflow, DeepSpeed lowered the loss scale and skipped", self.stage, step)
            return False
        what = f"non-finite loss {total}" if not finite else "non-finite gradient norm (the loss was finite)"
        if self.cfg.on_nonfinite == "error":
            raise NonFiniteLossError(self._nonfinite_message(step, what))
        log.warning("stage %d step %d: %s; optimizer step skipped (train.on_nonfinite=skip)", self.stage, step, what)
        return False

    def _answer_tokens(self, i: int) -> int:
        """Gold answer tokens of example ``i`` (a group's candidates do not count)."""
        return sum(1 for x in self.examples[i].labels if x != -100)

    def _micro_step(
        self, groups: list[Example], normaliser: float, counts: dict[str, int], fill: bool = False
    ) -> dict[str, float]:
        """Forward and backward of one micro-batch; its share of the step's tally.

        ``fill``: a filler forward (see :mod:`msl_ds.batching`): the collectives run, the loss is
        multiplied by zero and nothing is tallied.
        """
        rows, chosen, rejected = flatten(groups)
        # logits path: they feed nothing but this loss, so its backward may overwrite them with
        # their gradient instead of allocating a second [B, T, V] buffer
        if self.cfg.packing:  # one sequence, no padding (msl_ds.packing)
            batch = {k: v.to(D.device()) for k, v in collate_packed(rows).items()}
            logps, n_tokens = self.logprobs.packed(
                batch["input_ids"], batch["position_ids"], batch["labels"], batch["row_index"], len(rows),
                inplace_backward=True,
            )  # fmt: skip
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        else:
            batch = {k: v.to(D.device()) for k, v in collate(rows, self.pad_id).items()}
            logps, n_tokens = self.logprobs(
                batch["input_ids"], batch["attention_mask"], batch["labels"], inplace_backward=True
            )
        labels = batch["labels"]
        roles = torch.tensor([x.role for x in rows], dtype=torch.long, device=labels.device)
        ref = torch.tensor([x.ref_logp for x in rows], dtype=torch.float32, device=labels.device)
        weights = torch.tensor([x.weight for x in rows], dtype=torch.float32, device=labels.device)
        local = group_counts(groups)
        cfg = scaled_loss_config(self.loss_cfg, local, counts, D.world_size() * self._shape.accum)
        pairs = {}
        if cfg.needs_pairs():
            pairs = {
                "chosen_idx": torch.tensor(chosen, dtype=torch.long),
                "rejected_idx": torch.tensor(rejected, dtype=torch.long),
            }
        loss, metrics = preference_loss_from_logps(
            logps, n_tokens, roles, ref, cfg, weights=weights, token_normalizer=normaliser, **pairs
        )
        if fill:
            self.engine.backward(loss * 0.0)
            return {}
        value = loss.detach().item()
        if not math.isfinite(value) and self.cfg.on_nonfinite == "skip":
            # NaN times anything is NaN: every gradient of this backward becomes NaN, so DeepSpeed's
            # own overflow check skips the step on every rank even where the loss's gradient was finite
            loss = loss * float("nan")
        self.engine.backward(loss)
        # report the un-normalised share of the global mean (what this rank contributed)
        margin = (metrics["logps"].float() - ref).cpu()
        tally = {"loss": value / self._shape.accum, **{k: float(v) for k, v in local.items()}}
        ids = batch["input_ids"]
        # attention spans a row, not the packed sequence: positions x their own row's length
        seq = sum(len(x.input_ids) ** 2 for x in rows) if self.cfg.packing else ids.numel() * ids.shape[1]
        tally.update(tok_all=float(ids.numel()), tok_real=float(batch["attention_mask"].sum()), tok_seq=float(seq))
        for name, role in (("aligned", ROLE_ALIGNED), ("conflict", ROLE_CONFLICT)):
            tally[f"r_{name}"] = float(margin[roles.cpu() == role].sum())
        for t, c in TERMS.items():
            tally[f"loss_{t}"] = float(metrics.get(f"loss/{t}", 0.0)) * local[c]
        return tally

    def _log(self, step: int, loss: float, tokens: int, elapsed: float) -> None:
        gs = self.global_step0 + step + 1
        lr = self.engine.get_lr()[0] if hasattr(self.engine, "get_lr") else float("nan")
        gn = self.engine.get_global_grad_norm() if hasattr(self.engine, "get_global_grad_norm") else None
        values = {
            "train/loss": loss,
            "train/lr": lr,
            "train/answer_tokens_per_s": tokens / max(elapsed, 1e-9),
            "train/stage": self.stage,
        }
        if gn is not None:
            values["train/grad_norm"] = float(gn)
        values.update(self._pbl_values(self._window))
        now = time.time()
        rates = self._throughput.report(now - self._t_log) if self._throughput is not None else {}
        self._t_log = now
        values.update({f"train/{k}": v for k, v in rates.items()})
        self._window = []
        self.monitor.scalars(values, gs)
        self.history.append({"step": step + 1, **{k.split("/")[1]: v for k, v in values.items()}})
        done, left = step + 1 - self._start, len(self.plan) - step - 1
        mfu = rates.get("mfu", float("nan"))  # NaN: no peak FLOP/s known for the device (monitor.peak_tflops)
        log.info(
            "%s · train · step %d/%d · loss %.4f · lr %.2e · %.0f tok/s (%.0f non-pad) · %.2f s/step · MFU %s · "
            "peak %.2f GiB · ETA %s",
            self.label, step + 1, len(self.plan), loss, lr, rates.get("tokens_per_s_all", float("nan")),
            rates.get("tokens_per_s_nonpad", float("nan")), rates.get("step_time_s", float("nan")),
            f"{100 * mfu:.1f}%" if math.isfinite(mfu) else "-", rates.get("peak_mem_gib", float("nan")),
            duration(elapsed / max(done, 1) * left),
        )  # fmt: skip

    def _pbl_values(self, tallies: list[dict[str, float]], prefix: str = "train/") -> dict[str, float]:
        """Mean log-ratio margins and preference-term values over ``tallies`` (steps)."""
        win = {k: sum(t[k] for t in tallies) for k in TALLY}
        values = {}
        for name in ("aligned", "conflict"):
            if win[name]:
                values[f"{prefix}margin_{name}"] = win[f"r_{name}"] / win[name]
        for t, c in TERMS.items():
            if self.loss_cfg.weight(t) and win[c]:
                values[f"{prefix}loss_{t}"] = win[f"loss_{t}"] / win[c]
        return values
