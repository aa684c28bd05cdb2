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

The fused path is only right when the model's logits are exactly its lm-head's output: a family
that transforms them afterwards (soft-capping, a logit multiplier, remote code) would train on
wrong log-probs. Rather than a list of known config keys, the first forward checks it on the
model itself (:meth:`AnswerLogprobs._verify`): a few of the batch's rows go through both paths
and must agree; ``fused_linear`` then refuses (naming ``train.logprobs=logits``) and ``auto``
falls back to ``logits`` with a warning.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import Tensor

from msl_ds import distributed as D
from msl_ds.kernels import FusedLMHeadLogprobs, sequence_logprobs
from msl_ds.packing import segment_sum

log = logging.getLogger(__name__)

MODES = ("auto", "fused_linear", "logits")
CHECK_ROWS = 2  # rows of the first batch that go through both paths (the first-forward check)
CHECK_ULPS = 4  # rounding allowed per answer token: this many units of the logits' dtype at their largest value
CHECK_RTOL = 1e-4  # and this much of a row's log-prob (fp32 sums in another order)


class LogprobsError(ValueError):
    """``train.logprobs=fused_linear`` asked of a model that cannot take it."""


def fused_unsupported(model) -> str | None:
    """Why ``model`` has no lm-head the fused path could replace (``None`` when it has one).

    Only the structure is checked here; whether the logits are that head's output unchanged is
    checked on the first forward (:meth:`AnswerLogprobs._verify`).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return f"{type(model).__name__} has no nn.Linear output embedding (got {type(head).__name__})"
    return None


def resolve_mode(mode: str, model, device: torch.device) -> str:
    """The concrete path (``fused_linear`` or ``logits``) for ``train.logprobs=mode``."""
    if mode not in MODES:
        raise LogprobsError(f"train.logprobs: {mode!r} is not one of {list(MODES)}")
    if mode == "logits" or (mode == "auto" and device.type != "cuda"):
        return "logits"
    why = fused_unsupported(model)
    if why is None:
        return "fused_linear"
    if mode == "auto":
        log.warning("train.logprobs=auto: %s; falling back to the logits path (train.logprobs=logits)", why)
        return "logits"
    raise LogprobsError(f"train.logprobs=fused_linear: {why}; use train.logprobs=logits")


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
    installed on the engine's lm-head once, at construction, and checked against the logits
    path on the first call (:meth:`_verify`); outside :meth:`__call__` the lm-head behaves
    exactly as before (generation, exports).
    """

    def __init__(self, engine, mode: str = "auto", **fused_kw: Any):
        self.engine = engine
        self.requested = mode
        model = engine.module
        self.mode = resolve_mode(mode, model, next(model.parameters()).device)
        self._fused: FusedLMHeadLogprobs | None = None
        self._verified = self.mode == "logits"
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
        if not self._verified:
            k = min(CHECK_ROWS, labels.shape[0])
            t = _span(mask[:k])
            kw = dict(input_ids=input_ids[:k, :t], attention_mask=attention_mask[:k, :t], use_cache=False)
            self._verify(kw, labels[:k, :t], mask[:k, :t], lambda x: x)
        if self.mode == "logits":
            out = self.engine(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return sequence_logprobs(out.logits, labels, mask, inplace_backward=inplace_backward)
        logps = self._fused_call(
            dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False), labels, mask
        )
        return logps, mask.sum(1).to(logps.dtype)

    def _fused_call(self, kw: dict[str, Any], targets: Tensor, mask: Tensor) -> Tensor:
        """One engine call with the fused request pending: the lm-head's ``[rows]`` log-probs."""
        with self._request(targets, mask):
            out = self.engine(**kw).logits
            if self._fused.pending is not None:
                raise RuntimeError("train.logprobs=fused_linear: the model's forward never called its lm_head")
        if out.shape != mask.shape[:1]:
            raise RuntimeError(
                f"train.logprobs=fused_linear: the model turned the lm-head's {list(mask.shape[:1])} output into "
                f"{list(out.shape)}; use train.logprobs=logits for {type(self.engine.module).__name__}"
            )
        return out

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
        if not self._verified:  # the first rows: a prefix of the packed sequence (rows are in order)
            k = min(CHECK_ROWS, rows)
            p = int((row_index < k).sum())
            kw = dict(
                input_ids=input_ids[:, :p], position_ids=position_ids[:, :p], attention_mask=None, use_cache=False
            )
            self._verify(kw, targets[:p], mask[:p], lambda x: segment_sum(x, row_index[:p], k))
        kw = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False)
        if self.mode == "logits":
            logits = self.engine(**kw).logits
            per_token, _ = sequence_logprobs(
                logits.reshape(L, 1, logits.shape[-1]), targets, mask, inplace_backward=inplace_backward
            )
        else:
            per_token = self._fused_call(kw, targets, mask)
        logps = segment_sum(per_token, row_index, rows)
        return logps, segment_sum(mask.reshape(L).to(logps.dtype), row_index, rows)

    def _verify(self, kw: dict[str, Any], targets: Tensor, mask: Tensor, per_row: Callable[[Tensor], Tensor]) -> None:
        """The first-forward check of the fused path: the same rows through both paths must agree.

        ``kw`` is an engine call on a few rows (``targets``/``mask`` as the fused request takes
        them, ``per_row`` sums per-sequence log-probs into rows). Two things are checked, in eval
        mode (no dropout) and without gradients, every rank on its own rows, the verdict agreed
        over all ranks (every rank then takes the same path: ZeRO-3 needs their forwards in step):

        * the model's logits are exactly its lm-head's output (what the fused path replaces);
          a multiplier, soft-capping or any other transform after the head breaks this;
        * the fused log-probs equal the logits path's, up to the rounding of the logits' dtype
          (``CHECK_ULPS`` units at the largest logit per answer token, plus ``CHECK_RTOL``).

        On a disagreement ``fused_linear`` raises :class:`LogprobsError` naming
        ``train.logprobs=logits``; ``auto`` warns and switches to the logits path for good.
        """
        module = self.engine.module
        head = module.get_output_embeddings()
        outputs: list[Tensor] = []
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                hook = head.register_forward_hook(lambda _m, _i, out: outputs.append(out))
                try:
                    logits = self.engine(**kw).logits
                finally:
                    hook.remove()
                plain, _ = sequence_logprobs(logits.reshape(*targets.shape, logits.shape[-1]), targets, mask)
                try:
                    fused = self._fused_call(kw, targets, mask)
                except RuntimeError as exc:  # decided with the other ranks below, not raised alone
                    why = str(exc)
                else:
                    n_tokens = per_row(mask.sum(-1).float())
                    why = _disagreement(logits, outputs, per_row(plain.float()), per_row(fused.float()), n_tokens)
        finally:
            module.train(was_training)
        failed = D.all_reduce_sum([1.0 if why else 0.0])[0]
        self._verified = True
        if not failed:
            log.info(
                "train.logprobs=%s: the fused lm-head agrees with the logits path on the first batch", self.requested
            )
            return
        why = why or f"it does on {int(failed)} other rank(s)"
        name = type(module).__name__
        if self.requested == "auto":
            log.warning(
                "train.logprobs=auto: the fused lm-head disagrees with the logits path on the first batch of %s (%s); "
                "falling back to the logits path (train.logprobs=logits)", name, why,
            )  # fmt: skip
            self.mode = "logits"
            return
        raise LogprobsError(
            f"train.logprobs=fused_linear: the fused lm-head disagrees with the logits path on the first batch of "
            f"{name} ({why}); its log-probs would be wrong: use train.logprobs=logits"
        )


def _span(mask: Tensor) -> int:
    """Positions up to the last answer token of ``mask`` [rows, T] (at least 1): causal attention
    makes later ones irrelevant, so the check's logits stay small."""
    cols = mask.any(0).nonzero()
    return int(cols[-1]) + 1 if cols.numel() else 1


def _disagreement(
    logits: Tensor, head_outputs: list[Tensor], plain: Tensor, fused: Tensor, n_tokens: Tensor
) -> str | None:
    """Why the fused path cannot stand in for the logits path on these rows (``None``: it can)."""
    if len(head_outputs) != 1:
        return f"the forward called the lm-head {len(head_outputs)} times, not once"
    out = head_outputs[0]
    if out.shape != logits.shape:
        return f"the model's logits {list(logits.shape)} are not its lm-head's output {list(out.shape)}"
    # (no fp32 copies of [rows, T, V] unless the model upcast its logits: at V = 128k they are GBs)
    if not torch.equal(out.to(logits.dtype), logits):
        diff = (out.to(logits.dtype) - logits).abs().max().item()
        return f"the model's logits differ from its lm-head's output by up to {diff:.3g}: it transforms them after the head"
    ulp = torch.finfo(out.dtype).eps * (1.0 + logits.abs().amax().item())
    tol = CHECK_RTOL * (1.0 + plain.abs()) + n_tokens.to(plain.dtype) * CHECK_ULPS * ulp
    diff = (fused - plain).abs()
    if bool((diff > tol).any()):
        i = int((diff - tol).argmax())
        return (
            f"row {i}: fused log-prob {fused[i].item():.6g} vs logits path {plain[i].item():.6g} "
            f"(tolerance {tol[i].item():.3g})"
        )
    return None
