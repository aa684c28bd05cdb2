"""Fused per-sequence log-probs and preference losses.

Public API (used by the trainer)::

    from msl_ds.kernels import (LossConfig, preference_loss, sequence_logprobs,
                                ROLE_GOLD, ROLE_ALIGNED, ROLE_CONFLICT, ROLE_IGNORE)

The heavy part is :func:`sequence_logprobs`, one autograd function mapping logits
``[N, T, V]`` to per-sequence sums of target log-probs ``[N]``:

* ``backend="triton"`` (:mod:`.triton_logprob`): one pass over the logits with an
  online logsumexp in fp32; backward writes ``g_seq * (onehot - softmax)`` directly,
  optionally in place into the logits buffer.  Runs on CUDA tensors, or on CPU
  tensors when ``TRITON_INTERPRET=1`` (tests).
* ``backend="torch"`` (:mod:`.chunked`): chunked PyTorch with bounded memory.
* ``backend="auto"``: Triton for CUDA tensors when triton is importable, else torch.

All losses are cheap functions of the ``[N]`` vectors (:mod:`.losses`).  The
fused-linear variant (:mod:`.fused_linear`) starts from hidden states and the
lm-head weight and never materialises the logits.
"""

from __future__ import annotations

import logging

from torch import Tensor

from .chunked import chunked_sequence_logprobs, naive_sequence_logprobs
from .fused_linear import FusedLMHeadLogprobs, fused_linear_sequence_logprobs
from .losses import (
    ROLE_ALIGNED,
    ROLE_CONFLICT,
    ROLE_GOLD,
    ROLE_IGNORE,
    WEIGHT_FIELD,
    LossConfig,
    log1mexp,
    preference_loss_from_logps,
)
from .triton_logprob import interpret_mode, triton_available

_BACKENDS = ("auto", "torch", "triton")
log = logging.getLogger(__name__)
_warned_no_triton: list[bool] = []


def _warn_no_triton() -> None:
    """Say once per process that CUDA tensors take the (several times slower) torch kernels."""
    if not _warned_no_triton:
        _warned_no_triton.append(True)
        log.warning(
            "triton is not importable: the log-prob kernels run their torch backend on CUDA tensors, several "
            "times slower than the Triton kernels (install msl_ds[triton])"
        )


def resolve_backend(logits: Tensor, backend: str = "auto") -> str:
    """Return the concrete backend ("torch" or "triton") for ``logits``."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        if logits.is_cuda and not triton_available():
            _warn_no_triton()
        return "triton" if (logits.is_cuda and triton_available()) else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but triton is not importable")
        if not logits.is_cuda and not interpret_mode():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1")
    return backend


def sequence_logprobs(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    ignore_index: int = -100,
    backend: str = "auto",
    inplace_backward: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-sequence sums of target log-probs.

    Args:
        logits: [N, T, V] (any float dtype), already aligned with ``targets`` (the caller
            shifts).  May be a non-contiguous view such as ``logits[:, :-1]``.
        targets: [N, T] token ids; entries equal to ``ignore_index`` count as masked.
        mask: [N, T] bool / 0-1 mask of response tokens.
        backend: "auto" | "torch" | "triton".
        inplace_backward: write d loss/d logits into the logits buffer (the caller
            guarantees the logits are not needed by anything else in backward).

    Returns:
        ``(logps, n_tokens)``: ``logps [N]`` fp32 = sum_t valid * log p(target_t)
        (differentiable wrt ``logits``; fp64 for fp64 logits on the torch backend) and
        ``n_tokens [N]`` fp32 = number of valid tokens.  Fully masked rows give
        ``logps = 0``, ``n_tokens = 0`` and zero gradient.  No fp32 ``[N, T, V]`` tensor
        is created.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [N, T, V], got {tuple(logits.shape)}")
    if targets.shape != logits.shape[:2] or mask.shape != logits.shape[:2]:
        raise ValueError(
            f"targets {tuple(targets.shape)} and mask {tuple(mask.shape)} must be [N, T] = {tuple(logits.shape[:2])}"
        )
    be = resolve_backend(logits, backend)
    if be == "triton":
        from .triton_logprob import triton_sequence_logprobs

        return triton_sequence_logprobs(
            logits, targets, mask, ignore_index=ignore_index, inplace_backward=inplace_backward
        )
    return chunked_sequence_logprobs(
        logits, targets, mask, ignore_index=ignore_index, inplace_backward=inplace_backward
    )


def preference_loss(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    roles: Tensor,
    ref_logps: Tensor | None,
    cfg: LossConfig,
    *,
    weights: Tensor | None = None,
    chosen_idx: Tensor | None = None,
    rejected_idx: Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    inplace_backward: bool = False,
    token_normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict]:
    """``sequence_logprobs`` followed by :func:`preference_loss_from_logps`.

    Returns the scalar loss (differentiable) and a metrics dict of detached tensors:
    ``logps`` [N], ``n_tokens`` [N], ``loss``, ``loss/<term>`` for each active term
    (``sft``, ``pp``, ``np``, ``dpo``, ``ipo``, ``hinge``, ``orpo``, ``simpo``),
    ``margin/aligned`` / ``margin/conflict`` (mean ``logp - ref`` over those rows, 0
    without such rows), ``n/gold``, ``n/aligned``, ``n/conflict`` and pair statistics.  See
    :mod:`msl_ds.kernels.losses` for the exact formulas.
    """
    logps, n_tokens = sequence_logprobs(
        logits,
        targets,
        mask,
        ignore_index=ignore_index,
        backend=backend,
        inplace_backward=inplace_backward,
    )
    return preference_loss_from_logps(
        logps,
        n_tokens,
        roles,
        ref_logps,
        cfg,
        weights=weights,
        chosen_idx=chosen_idx,
        rejected_idx=rejected_idx,
        token_normalizer=token_normalizer,
    )


__all__ = [
    "ROLE_IGNORE",
    "ROLE_GOLD",
    "ROLE_ALIGNED",
    "ROLE_CONFLICT",
    "LossConfig",
    "WEIGHT_FIELD",
    "sequence_logprobs",
    "preference_loss",
    "preference_loss_from_logps",
    "chunked_sequence_logprobs",
    "naive_sequence_logprobs",
    "fused_linear_sequence_logprobs",
    "FusedLMHeadLogprobs",
    "log1mexp",
    "resolve_backend",
    "triton_available",
]
