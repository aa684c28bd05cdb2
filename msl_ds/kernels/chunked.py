"""Chunked PyTorch implementation of :func:`msl_ds.kernels.sequence_logprobs`.

This is the CPU path (and the ``backend="torch"`` path on any device).  It has the
same semantics as the Triton kernel:

* forward: for every *valid* token (``mask & targets != ignore_index``) compute
  ``log p(target) = logit[target] - logsumexp(logits)`` in fp32 (fp64 for fp64
  inputs), then sum per sequence;
* backward: ``d loss / d logits[n, t, :] = g_seq[n] * valid[n, t] * (onehot(target) - softmax)``,
  recomputing the softmax from the saved per-token ``logsumexp``.

Memory is bounded: only ``chunk_tokens`` rows of the vocabulary are ever upcast to
fp32 at a time, and only the valid tokens are visited (prompt / padding tokens cost
nothing in forward and only a zero-fill in backward).  No fp32 ``[N, T, V]`` tensor
is created.  Non-contiguous logits (e.g. ``logits[:, :-1]``) are read through
advanced indexing without a full copy.

With ``inplace_backward=True`` the gradient is written into the logits buffer itself
(the caller guarantees nothing else needs the logits after this loss); otherwise a
fresh gradient tensor of the logits' dtype is allocated, exactly as autograd would
for the naive implementation.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Number of fp32 elements processed per chunk (32 MiB of fp32).  The chunk covers
# ``max(1, _CHUNK_ELEMS // V)`` tokens.
DEFAULT_CHUNK_ELEMS = 1 << 23


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def valid_token_mask(targets: Tensor, mask: Tensor, ignore_index: int) -> Tensor:
    """Boolean [N, T]: response-mask AND target != ignore_index."""
    return mask.bool() & (targets != ignore_index)


def check_targets(targets: Tensor, valid: Tensor, vocab: int) -> None:
    """Refuse a target id outside ``[0, vocab)`` at a valid position (one host sync).

    Triton would read such a column out of bounds without a word, and a clamp would score the
    wrong token; the ids come from a tokenizer that does not match the model's vocabulary.
    """
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        n, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"target id {int(targets[n, t])} at row {n}, position {t} is outside the vocabulary [0, {vocab}) "
            f"({int(bad.sum())} such targets): the tokenizer and the model's lm-head disagree on the vocabulary"
        )


def chunk_rows_for(vocab: int, chunk_elems: int | None) -> int:
    elems = DEFAULT_CHUNK_ELEMS if chunk_elems is None else int(chunk_elems)
    return max(1, elems // max(int(vocab), 1))


def _bump_version(t: Tensor) -> None:
    """Mark ``t`` as modified in place so autograd catches illegal reuse."""
    inc = getattr(torch.autograd.graph, "increment_version", None)
    if inc is not None:
        try:
            inc(t)
        except Exception:  # pragma: no cover - best effort only
            pass


def _row_spans(valid: Tensor, chunk_rows: int) -> list[tuple[int, int, int]]:
    """Chunks ``(n, t0, t1)`` covering, per row, the span between its first and last valid
    token (prompt prefix / padding suffix are skipped), at most ``chunk_rows`` tokens each."""
    N, T = valid.shape
    if N == 0 or T == 0:
        return []
    v = valid.to(torch.int8)
    has = v.any(1)
    first = v.argmax(1)
    last = T - 1 - v.flip(1).argmax(1)
    spans = []
    for n, (h, lo, hi) in enumerate(zip(has.tolist(), first.tolist(), last.tolist())):
        if not h:
            continue
        for t0 in range(lo, hi + 1, chunk_rows):
            spans.append((n, t0, min(t0 + chunk_rows, hi + 1)))
    return spans


class _ChunkedSequenceLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, valid: Tensor, chunk_rows: int, inplace_backward: bool):
        N, T, V = logits.shape
        acc = _acc_dtype(logits.dtype)
        spans = _row_spans(valid, chunk_rows)
        tgt = targets.clamp(min=0).long()
        lse = torch.zeros(N, T, dtype=acc, device=logits.device)
        tok = torch.zeros(N, T, dtype=acc, device=logits.device)
        for n, t0, t1 in spans:
            x = logits[n, t0:t1].to(acc)  # [c, V] view (fp32 input) or bounded upcast copy
            lse_c = torch.logsumexp(x, dim=-1)
            lse[n, t0:t1] = lse_c
            tok[n, t0:t1] = x.gather(1, tgt[n, t0:t1, None]).squeeze(1) - lse_c
            del x
        tok = tok * valid
        ctx.save_for_backward(logits, tgt, valid, lse)
        ctx.spans = spans
        ctx.inplace_backward = inplace_backward
        return tok.sum(1)

    @staticmethod
    def backward(ctx, g_seq: Tensor):
        logits, tgt, valid, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        acc = lse.dtype
        N, T, V = logits.shape
        grad = logits if ctx.inplace_backward else torch.empty_like(logits)
        g_tok_all = g_seq.to(acc)[:, None] * valid  # [N, T]
        covered = torch.zeros(N, T, dtype=torch.bool, device=logits.device)
        for n, t0, t1 in ctx.spans:
            covered[n, t0:t1] = True
            out = grad[n, t0:t1]
            g_tok = g_tok_all[n, t0:t1, None]
            src = logits[n, t0:t1]
            if out.dtype == acc:
                # compute directly in the output rows (no temporary); src may alias out
                if out.data_ptr() != src.data_ptr():
                    out.copy_(src)
                x = out
            else:
                x = src.to(acc)
            # d = g * (onehot - softmax)
            x.sub_(lse[n, t0:t1, None]).exp_().mul_(-g_tok)
            x.scatter_add_(1, tgt[n, t0:t1, None], g_tok)
            if x is not out:
                out.copy_(x)
            del x
        # rows outside the valid spans (prompt / padding / fully masked) get zero gradient
        grad[~covered] = 0
        if ctx.inplace_backward:
            _bump_version(logits)
        return grad, None, None, None, None


def chunked_sequence_logprobs(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    chunk_elems: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sequence target log-prob sums with bounded memory (see module docstring).

    Returns ``(logps [N], n_tokens [N])`` in fp32 (fp64 for fp64 logits).
    """
    valid = valid_token_mask(targets, mask, ignore_index)
    check_targets(targets, valid, logits.shape[-1])
    n_tokens = valid.sum(1).to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    rows = chunk_rows_for(logits.shape[-1], chunk_elems)
    logps = _ChunkedSequenceLogprobs.apply(logits, targets, valid, rows, bool(inplace_backward))
    return logps, n_tokens


def naive_sequence_logprobs(
    logits: Tensor, targets: Tensor, mask: Tensor, *, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """Reference implementation: fp32 ``log_softmax`` over the full [N, T, V] + gather.

    Used by benchmarks and tests only; memory hungry by design.
    """
    valid = valid_token_mask(targets, mask, ignore_index)
    acc = _acc_dtype(logits.dtype)
    lp = torch.log_softmax(logits.to(acc), dim=-1)
    tok = lp.gather(-1, targets.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)
    tok = torch.where(valid, tok, torch.zeros((), dtype=acc, device=logits.device))
    return tok.sum(-1), valid.sum(-1).to(acc)
