"""Answer-token log-probs of a causal LM, with or without materialising its logits.

``train.logprobs`` picks the path the trainer and the probe's reference log-probs take:

* ``logits``: ``engine(...).logits`` (``[rows, T, V]`` for every position, prompts included),
  then :func:`msl_ds.kernels.sequence_logprobs`.
* ``fused_linear``: the lm-head's forward is replaced, for the duration of one engine call, by
  :class:`msl_ds.kernels.FusedLMHeadLogprobs` on the final hidden states: it computes the
  log-probs of the answer tokens only (``labels != -100``) in vocabulary blocks and hands back
  ``[rows]`` instead of logits. The call still goes through ``engine(...)`` (DeepSpeed's forward
  bookkeeping and ZeRO-3's module hooks: the lm-head's own pre-forward/pre-backward hooks gather
  its weight, so the fused kernel reads the full weight and its gradient reaches the partition
  through the ordinary gradient hooks).
* ``auto``: ``fused_linear`` on CUDA, ``logits`` on CPU (where the [rows, T, V] block is small
  and the plain path is the reference).

Families whose causal-LM head transforms the logits after the linear layer (soft-capping,
scaling) cannot take the fused path: ``fused_linear`` refuses them and ``auto`` falls back.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from msl_ds.kernels import FusedLMHeadLogprobs, sequence_logprobs
from msl_ds.packing import segment_sum

log = logging.getLogger(__name__)

MODES = ("auto", "fused_linear", "logits")
# config attributes of families that post-process the lm-head's output (value: the neutral one)
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


class LogprobsError(ValueError):
    """``train.logprobs=fused_linear`` asked of a model that cannot take it."""


def fused_unsupported(model) -> str | None:
    """Why ``model``'s logits are not ``lm_head(hidden)`` (``None`` when they are)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return f"{type(model).__name__} has no nn.Linear output embedding (got {type(head).__name__})"
    cfg = getattr(model, "config", None)
    for key, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(cfg, key, neutral)
        if value is not None and value != neutral:
            return f"{type(model).__name__} post-processes its logits ({key}={value})"
    return None


def resolve_mode(mode: str, model, device: torch.device) -> str:
    """The concrete path (``fused_linear`` or ``logits``) for ``train.logprobs=mode``."""
    if mode not in MODES:
        raise LogprobsError(f"train.logprobs: {mode!r} is not one of {list(MODES)}")
    why = fused_unsupported(model)
    if mode == "auto":
        return "fused_linear" if device.type == "cuda" and why is None else "logits"
    if mode == "fused_linear" and why is not None:
        raise LogprobsError(f"train.logprobs=fused_linear: {why}; use train.logprobs=logits")
    return mode


def install_fused_head(head: torch.nn.Linear, **fused_kw: Any) -> FusedLMHeadLogprobs:
    """Let ``head``'s forward answer a pending request with fused log-probs (idempotent).

    The returned :class:`FusedLMHeadLogprobs` carries ``pending``: ``(targets, mask)`` for the
    next forward, which then returns ``logps [rows]`` instead of logits and clears it. Without a
    request the head runs its ordinary forward. The wrapper is kept out of the module tree on
    purpose: it holds ``head`` itself (no cycle, no new state-dict names), and it runs inside
    head's forward, where ZeRO-3 has gathered the weight already.
    """
    fused = getattr(head, "_msl_fused", None)
    if fused is not None:
        return fused
    fused = FusedLMHeadLogprobs(head, **fused_kw)
    fused.pending = None
    plain = head.forward

    def forward(hidden: Tensor) -> Tensor:
        if fused.pending is None:
            return plain(hidden)
        (targets, mask), fused.pending = fused.pending, None
        if hidden.shape[:-1] != targets.shape:  # packed rows: [1, L, H] scored per position as [L, 1, H]
            hidden = hidden.reshape(*targets.shape, hidden.shape[-1])
        return fused(hidden, targets, mask)[0]

    object.__setattr__(head, "_msl_fused", fused)
    head.forward = forward
    return fused


class AnswerLogprobs:
    """``(logps [rows], n_tokens [rows])`` of the answer tokens of a collated batch.

    ``labels`` are the collated next-token targets (``-100`` off the answer). The fused path is
    installed on the engine's lm-head once, at construction; outside :meth:`__call__` the
    lm-head behaves exactly as before (generation, exports).
    """

    def __init__(self, engine, mode: str = "auto", **fused_kw: Any):
        self.engine = engine
        model = engine.module
        self.mode = resolve_mode(mode, model, next(model.parameters()).device)
        self._fused: FusedLMHeadLogprobs | None = None
        log.info("answer log-probs: %s (train.logprobs=%s)", self.mode, mode)
        if self.mode == "fused_linear":
            self._fused = install_fused_head(model.get_output_embeddings(), **fused_kw)

    @contextmanager
    def _request(self, targets: Tensor, mask: Tensor):
        self._fused.pending = (targets, mask)
        try:
            yield
        finally:
            self._fused.pending = None

    def __call__(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *, inplace_backward: bool = False
    ) -> tuple[Tensor, Tensor]:
        mask = labels != -100
        if self.mode == "logits":
            out = self.engine(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return sequence_logprobs(out.logits, labels, mask, inplace_backward=inplace_backward)
        with self._request(labels, mask):
            out = self.engine(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            if self._fused.pending is not None:
                raise RuntimeError("train.logprobs=fused_linear: the model's forward never called its lm_head")
        logps = out.logits
        if logps.shape != mask.shape[:1]:
            raise RuntimeError(
                f"train.logprobs=fused_linear: the model turned the lm-head's [rows] output into "
                f"{tuple(logps.shape)}; use train.logprobs=logits for {type(self.engine.module).__name__}"
            )
        n_tokens = mask.sum(1).to(logps.dtype)
        return logps, n_tokens

    def packed(
        self, input_ids: Tensor, position_ids: Tensor, labels: Tensor, row_index: Tensor, rows: int,
        *, inplace_backward: bool = False,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """The same ``(logps [rows], n_tokens [rows])`` from rows packed into one sequence
        (:func:`msl_ds.packing.collate_packed`): no attention mask, ``position_ids`` restarting per
        row; every position is scored as a sequence of its own, then summed back per row."""
        L = labels.shape[1]
        targets = labels.reshape(L, 1)
        mask = targets != -100
        kw = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False)
        if self.mode == "logits":
            logits = self.engine(**kw).logits
            per_token, _ = sequence_logprobs(
                logits.reshape(L, 1, logits.shape[-1]), targets, mask, inplace_backward=inplace_backward
            )
        else:
            with self._request(targets, mask):
                per_token = self.engine(**kw).logits
                if self._fused.pending is not None:
                    raise RuntimeError("train.logprobs=fused_linear: the model's forward never called its lm_head")
            if per_token.shape != (L,):
                raise RuntimeError(
                    f"train.logprobs=fused_linear: the model turned the lm-head's [positions] output into "
                    f"{tuple(per_token.shape)}; use train.logprobs=logits for {type(self.engine.module).__name__}"
                )
        logps = segment_sum(per_token, row_index, rows)
        return logps, segment_sum(mask.reshape(L).to(logps.dtype), row_index, rows)
