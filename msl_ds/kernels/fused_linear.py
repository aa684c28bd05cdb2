"""Fused lm-head + per-sequence log-probs that never materialises the logits.

``fused_linear_sequence_logprobs(hidden [N,T,H], weight [V,H], targets, mask)`` returns
the same ``(logps [N], n_tokens [N])`` as ``sequence_logprobs(hidden @ weight.T, ...)``
but only ever holds a ``[chunk_tokens, chunk_vocab]`` block of logits (in the spirit of
Apple's Cut Cross-Entropy):

* forward: for each chunk of *valid* tokens, loop over vocabulary chunks, computing
  ``z = h @ W_v^T`` (in the hidden dtype, i.e. the same rounding as ``nn.Linear``),
  online logsumexp in fp32 and pick the target logit.  Saves only ``lse [M]`` fp32.
* backward (recompute): vocab chunks outer, token chunks inner; ``p = exp(z - lse)``,
  ``dz = g * (onehot - p)``; ``grad_h += dz @ W_v`` (fp32 accumulator ``[M, H]``) and
  ``grad_W[v] = sum_tokens dz^T @ h`` (fp32 accumulator ``[chunk_vocab, H]``, written
  once per vocab chunk), ``grad_b[v] = sum dz``.

Only valid tokens (``mask & targets != ignore_index``) are touched; prompt/padding rows
get zero gradient.

:class:`FusedLMHeadLogprobs` wraps an ``nn.Linear`` lm-head.  It owns the linear as a
submodule and reads ``self.lm_head.weight`` inside its own ``forward``; under DeepSpeed
ZeRO-3 the weight is registered as an *external parameter* of the wrapper, so ZeRO-3's
pre-forward / pre-backward hooks of the wrapper gather the partitioned weight and the
gradient produced here lands in ``weight.grad`` through the normal AccumulateGrad hooks
(exactly as for ``nn.Linear``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .chunked import valid_token_mask

DEFAULT_CHUNK_TOKENS = 1024
DEFAULT_CHUNK_VOCAB = 8192


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _FusedLinearSequenceLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, valid, chunk_tokens, chunk_vocab):
        N, T, H = hidden.shape
        V = weight.shape[0]
        if weight.dim() != 2 or weight.shape[1] != H:
            raise RuntimeError(
                f"lm_head weight has shape {tuple(weight.shape)}, expected [V, {H}] "
                "(under ZeRO-3 this means the weight was not gathered for this forward)"
            )
        acc = _acc(hidden.dtype)
        flat_idx = valid.reshape(-1).nonzero().squeeze(1)
        n_idx = torch.div(flat_idx, T, rounding_mode="floor")
        t_idx = flat_idx - n_idx * T
        tgt = targets[n_idx, t_idx].long()
        M = flat_idx.numel()
        h_all = hidden[n_idx, t_idx]  # [M, H] in hidden dtype
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        lse = torch.empty(M, dtype=acc, device=hidden.device)
        tok = torch.empty(M, dtype=acc, device=hidden.device)
        for s in range(0, M, chunk_tokens):
            e = min(s + chunk_tokens, M)
            h = h_all[s:e]
            tg = tgt[s:e]
            m = torch.full((e - s,), float("-inf"), dtype=acc, device=hidden.device)
            ssum = torch.zeros(e - s, dtype=acc, device=hidden.device)
            xt = torch.zeros(e - s, dtype=acc, device=hidden.device)
            for v0 in range(0, V, chunk_vocab):
                v1 = min(v0 + chunk_vocab, V)
                z = (h @ w[v0:v1].T if b is None else torch.addmm(b[v0:v1], h, w[v0:v1].T)).to(acc)
                m_new = torch.maximum(m, z.amax(dim=1))
                ssum = ssum * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(1)
                m = m_new
                inside = (tg >= v0) & (tg < v1)
                zt = z.gather(1, (tg - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
                xt = torch.where(inside, zt, xt)
                del z
            lse_c = m + torch.log(ssum)
            lse[s:e] = lse_c
            tok[s:e] = xt - lse_c
        logps = torch.zeros(N, dtype=acc, device=hidden.device)
        logps.index_add_(0, n_idx, tok)
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), n_idx, t_idx, tgt, lse)
        ctx.has_bias = bias is not None
        ctx.chunk_tokens = chunk_tokens
        ctx.chunk_vocab = chunk_vocab
        return logps

    @staticmethod
    def backward(ctx, g_seq):
        hidden, weight, bias, n_idx, t_idx, tgt, lse = ctx.saved_tensors
        acc = lse.dtype
        N, T, H = hidden.shape
        V = weight.shape[0]
        dt = hidden.dtype
        M = n_idx.numel()
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        w = weight.to(dt)
        b = bias.to(dt) if ctx.has_bias else None
        h_all = hidden[n_idx, t_idx]
        g_tok = g_seq.to(acc)[n_idx]
        gh = torch.zeros(M, H, dtype=acc, device=hidden.device) if need_h else None
        gw = torch.empty_like(weight) if need_w else None
        gb = torch.empty_like(bias) if (need_b and ctx.has_bias) else None
        ct, cv = ctx.chunk_tokens, ctx.chunk_vocab
        for v0 in range(0, V, cv):
            v1 = min(v0 + cv, V)
            wv = w[v0:v1]
            gw_acc = torch.zeros(v1 - v0, H, dtype=acc, device=hidden.device) if need_w else None
            gb_acc = torch.zeros(v1 - v0, dtype=acc, device=hidden.device) if gb is not None else None
            for s in range(0, M, ct):
                e = min(s + ct, M)
                h = h_all[s:e]
                z = (h @ wv.T if b is None else torch.addmm(b[v0:v1], h, wv.T)).to(acc)
                g = g_tok[s:e, None]
                # dz = g * (onehot - softmax)
                z.sub_(lse[s:e, None]).exp_().mul_(-g)
                tg = tgt[s:e]
                inside = (tg >= v0) & (tg < v1)
                col = (tg - v0).clamp(0, v1 - v0 - 1)[:, None]
                z.scatter_add_(1, col, torch.where(inside[:, None], g, torch.zeros_like(g)))
                dz = z.to(dt)
                if need_h:
                    gh[s:e] += (dz @ wv).to(acc)
                if need_w:
                    gw_acc += (dz.T @ h).to(acc)
                if gb_acc is not None:
                    gb_acc += z.sum(0)
                del z, dz
            if need_w:
                gw[v0:v1] = gw_acc.to(gw.dtype)
            if gb is not None:
                gb[v0:v1] = gb_acc.to(gb.dtype)
        grad_hidden = None
        if need_h:
            grad_hidden = torch.zeros_like(hidden)
            grad_hidden[n_idx, t_idx] = gh.to(dt)
        return grad_hidden, gw, gb, None, None, None, None


def fused_linear_sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunk_vocab: int = DEFAULT_CHUNK_VOCAB,
) -> tuple[Tensor, Tensor]:
    """``sequence_logprobs(hidden @ weight.T + bias, targets, mask)`` without the logits.

    Args:
        hidden: [N, T, H] final hidden states, already aligned with ``targets``.
        weight: [V, H] lm-head weight; ``bias`` optional [V].
        targets: [N, T] token ids; ``ignore_index`` entries are masked.
        mask: [N, T] response-token mask.

    Returns:
        ``(logps [N], n_tokens [N])`` fp32 (fp64 for fp64 hidden); differentiable wrt
        ``hidden``, ``weight`` and ``bias``.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [N, T, H], got {tuple(hidden.shape)}")
    valid = valid_token_mask(targets, mask, ignore_index)
    n_tokens = valid.sum(1).to(_acc(hidden.dtype))
    logps = _FusedLinearSequenceLogprobs.apply(
        hidden, weight, bias, targets, valid, max(1, int(chunk_tokens)), max(1, int(chunk_vocab))
    )
    return logps, n_tokens


class FusedLMHeadLogprobs(nn.Module):
    """``nn.Module`` wrapper: ``forward(hidden, targets, mask) -> (logps, n_tokens)``.

    ``lm_head`` is registered as a submodule (so state-dict names and weight tying are
    unchanged) but its ``forward`` is never called; the weight is read inside this
    module's ``forward``.  Under DeepSpeed ZeRO-3 the weight (and bias) are registered as
    external parameters of this module, so ZeRO-3 gathers them before this module's
    forward and backward and releases them afterwards; the full weight gradient is
    delivered to ``lm_head.weight`` through the usual gradient hooks.  (If the model was
    built outside ``deepspeed.zero.Init``, DeepSpeed's parameter-access hook registers
    the weight on first use instead; :meth:`register_zero3_external` can also be called
    explicitly after ``deepspeed.initialize``.)
    """

    def __init__(
        self,
        lm_head: nn.Linear,
        *,
        ignore_index: int = -100,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        chunk_vocab: int = DEFAULT_CHUNK_VOCAB,
    ) -> None:
        super().__init__()
        self.lm_head = lm_head
        self.ignore_index = ignore_index
        self.chunk_tokens = chunk_tokens
        self.chunk_vocab = chunk_vocab
        self.register_zero3_external()

    def register_zero3_external(self) -> None:
        """Register lm_head's params as ZeRO-3 external params of this module (no-op otherwise)."""
        params = [p for p in (self.lm_head.weight, getattr(self.lm_head, "bias", None)) if p is not None]
        if not any(hasattr(p, "ds_id") for p in params):
            return
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        for p in params:
            if hasattr(p, "ds_id"):
                register_external_parameter(self, p)

    def forward(self, hidden: Tensor, targets: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        weight = self.lm_head.weight
        bias = getattr(self.lm_head, "bias", None)
        return fused_linear_sequence_logprobs(
            hidden,
            weight,
            targets,
            mask,
            bias=bias,
            ignore_index=self.ignore_index,
            chunk_tokens=self.chunk_tokens,
            chunk_vocab=self.chunk_vocab,
        )
