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

Two backends share those loops.  ``"torch"`` (CPU, and fp64) does the per-chunk
elementwise work in PyTorch on an fp32 copy of the block.  ``"triton"`` (the default on
CUDA) leaves each ``z`` block in the hidden dtype and runs two Triton kernels on it: in
forward one pass folds the block into the running ``lse`` and picks the target logits; in
backward one pass turns the recomputed block into ``dz`` in place.  The fp32 gradient
accumulators are added to by the matmul itself (``addmm(..., out_dtype=float32)``) where
the installed PyTorch offers it.

:class:`FusedLMHeadLogprobs` holds an ``nn.Linear`` lm-head and computes the log-probs from
its weight (and bias).  It is not a module of the model: ``msl_ds.logprobs.install_fused_head``
calls it from inside the lm-head's own forward, so under DeepSpeed ZeRO-3 the lm-head's ordinary
pre-forward / pre-backward hooks have gathered the weight when it runs, and the weight gradient
returned here reaches the partition through the usual AccumulateGrad hooks, exactly as for the
plain ``nn.Linear`` (tests/scripts/zero3_fused_head.py checks the full gradients on 2 ranks).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .chunked import check_targets, valid_token_mask

DEFAULT_CHUNK_TOKENS = 1024
DEFAULT_CHUNK_VOCAB = 8192
# the Triton backend keeps z in the hidden dtype (2 bytes/element in bf16): bigger blocks, bigger matmuls
TRITON_CHUNK_TOKENS = 16384
TRITON_CHUNK_VOCAB = 16384

_ADDMM_OUT_DTYPE: dict[str, bool] = {}


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mm_acc_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32 and ``a``/``b`` possibly bf16/fp16.

    On CUDA the matmul adds into ``acc`` itself (``addmm(out_dtype=float32)``, fp32
    accumulation, no half-precision temporary) where this PyTorch has it; else through a
    temporary.
    """
    key = acc.device.type
    if a.dtype != acc.dtype and acc.is_cuda and _ADDMM_OUT_DTYPE.get(key, True):
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            _ADDMM_OUT_DTYPE[key] = True
            return
        except (RuntimeError, TypeError):
            _ADDMM_OUT_DTYPE[key] = False
    acc += (a @ b).to(acc.dtype)


def _resolve_backend(backend: str, hidden: Tensor) -> str:
    """The logits path's rules (``msl_ds.kernels.resolve_backend``), except that fp64 stays on
    torch: the block kernels compute in fp32."""
    from . import resolve_backend  # lazy: the package imports this module

    if backend == "auto" and hidden.dtype == torch.float64:
        return "torch"
    be = resolve_backend(hidden, backend)
    if be == "triton" and hidden.dtype == torch.float64:
        raise TypeError("the triton backend supports fp32/fp16/bf16 hidden states; use backend='torch' for fp64")
    return be


def _remember(kept: dict, keep: int, key: tuple, z: Tensor) -> None:
    """Hold on to the last ``keep`` logit blocks of forward, so backward need not recompute them."""
    if keep > 0:
        kept[key] = z
        if len(kept) > keep:
            del kept[next(iter(kept))]


def _torch_forward(h_all, w, b, tgt, chunk_tokens, chunk_vocab, acc, keep, kept):
    """Forward loops of the torch backend: ``(lse [M], tok [M])`` in ``acc``."""
    M, V = h_all.shape[0], w.shape[0]
    lse = torch.empty(M, dtype=acc, device=h_all.device)
    tok = torch.empty(M, dtype=acc, device=h_all.device)
    for s in range(0, M, chunk_tokens):
        e = min(s + chunk_tokens, M)
        h = h_all[s:e]
        tg = tgt[s:e]
        m = torch.full((e - s,), float("-inf"), dtype=acc, device=h_all.device)
        ssum = torch.zeros(e - s, dtype=acc, device=h_all.device)
        xt = torch.zeros(e - s, dtype=acc, device=h_all.device)
        for v0 in range(0, V, chunk_vocab):
            v1 = min(v0 + chunk_vocab, V)
            zr = h @ w[v0:v1].T if b is None else torch.addmm(b[v0:v1], h, w[v0:v1].T)
            _remember(kept, keep, (s, v0), zr)
            z = zr.to(acc)  # (nothing below writes into z: a kept zr stays intact)
            m_new = torch.maximum(m, z.amax(dim=1))
            # rows still all -inf (a masked-out vocabulary range) shift by 0: no (-inf) - (-inf)
            m_safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            ssum = ssum * torch.exp(m - m_safe) + torch.exp(z - m_safe[:, None]).sum(1)
            m = m_new
            inside = (tg >= v0) & (tg < v1)
            zt = z.gather(1, (tg - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
            xt = torch.where(inside, zt, xt)
            del z, zr
        lse_c = m + torch.log(ssum)
        lse[s:e] = lse_c
        tok[s:e] = xt - lse_c
    return lse, tok


def _triton_forward(h_all, w, b, tgt, chunk_tokens, chunk_vocab, acc, keep, kept):
    """Forward loops of the triton backend: each ``z`` block stays in the hidden dtype."""
    from .triton_logprob import triton_chunk_fold_

    M, V = h_all.shape[0], w.shape[0]
    lse = torch.full((M,), float("-inf"), dtype=acc, device=h_all.device)
    xt = torch.zeros(M, dtype=acc, device=h_all.device)
    for s in range(0, M, chunk_tokens):
        e = min(s + chunk_tokens, M)
        h = h_all[s:e]
        for v0 in range(0, V, chunk_vocab):
            v1 = min(v0 + chunk_vocab, V)
            z = h @ w[v0:v1].T if b is None else torch.addmm(b[v0:v1], h, w[v0:v1].T)
            triton_chunk_fold_(z, tgt[s:e], lse[s:e], xt[s:e], v0)  # reads z only
            _remember(kept, keep, (s, v0), z)
            del z
    return lse, xt - lse


def _dz_block(z, tg, lse, g, v0, acc, backend):
    """``d loss / d z`` for one block (``g [m, 1]``), in the hidden dtype."""
    if backend == "triton":
        from .triton_logprob import triton_chunk_grad_

        triton_chunk_grad_(z, tg, lse, g[:, 0], v0)
        return z
    v1 = v0 + z.shape[1]
    dt = z.dtype
    z = z.to(acc)
    # dz = g * (onehot - softmax)
    z.sub_(lse[:, None]).exp_().mul_(-g)
    inside = (tg >= v0) & (tg < v1)
    col = (tg - v0).clamp(0, v1 - v0 - 1)[:, None]
    z.scatter_add_(1, col, torch.where(inside[:, None], g, torch.zeros_like(g)))
    return z.to(dt)


class _FusedLinearSequenceLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, valid, chunk_tokens, chunk_vocab, backend, keep_blocks):
        N, T, H = hidden.shape
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
        h_all = hidden[n_idx, t_idx]  # [M, H] in hidden dtype
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        loops = _triton_forward if backend == "triton" else _torch_forward
        kept: dict = {}
        lse, tok = loops(h_all, w, b, tgt, chunk_tokens, chunk_vocab, acc, keep_blocks, kept)
        logps = torch.zeros(N, dtype=acc, device=hidden.device)
        logps.index_add_(0, n_idx, tok)
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), n_idx, t_idx, tgt, lse)
        ctx.has_bias = bias is not None
        ctx.chunk_tokens = chunk_tokens
        ctx.chunk_vocab = chunk_vocab
        ctx.backend = backend
        ctx.kept = kept  # intermediate blocks (no grad), dropped as backward uses them
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
        # d W is written block by block below; with no valid token (M == 0) no block is written,
        # so the buffer must start at zero (an empty one would hand back uninitialised memory)
        gw = (torch.zeros_like(weight) if M == 0 else torch.empty_like(weight)) if need_w else None
        gb = torch.empty_like(bias) if (need_b and ctx.has_bias) else None
        ct, cv = ctx.chunk_tokens, ctx.chunk_vocab
        one_token_chunk = M <= ct
        for v0 in range(0, V, cv):
            v1 = min(v0 + cv, V)
            wv = w[v0:v1]
            direct_w = need_w and one_token_chunk and gw.dtype == dt
            gw_acc = torch.zeros(v1 - v0, H, dtype=acc, device=hidden.device) if need_w and not direct_w else None
            gb_acc = torch.zeros(v1 - v0, dtype=acc, device=hidden.device) if gb is not None else None
            for s in range(0, M, ct):
                e = min(s + ct, M)
                h = h_all[s:e]
                z = ctx.kept.pop((s, v0), None)
                if z is None:
                    z = h @ wv.T if b is None else torch.addmm(b[v0:v1], h, wv.T)
                dz = _dz_block(z, tgt[s:e], lse[s:e], g_tok[s:e, None], v0, acc, ctx.backend)
                if need_h:
                    _mm_acc_(gh[s:e], dz, wv)
                if direct_w:
                    torch.mm(dz.T, h, out=gw[v0:v1])
                elif need_w:
                    _mm_acc_(gw_acc, dz.T, h)
                if gb_acc is not None:
                    gb_acc += dz.sum(0, dtype=acc)
                del z, dz
            if gw_acc is not None:
                gw[v0:v1] = gw_acc.to(gw.dtype)
            if gb is not None:
                gb[v0:v1] = gb_acc.to(gb.dtype)
        grad_hidden = None
        if need_h:
            grad_hidden = torch.zeros_like(hidden)
            grad_hidden[n_idx, t_idx] = gh.to(dt)
        ctx.kept.clear()
        return grad_hidden, gw, gb, None, None, None, None, None, None


def fused_linear_sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
    chunk_vocab: int | None = None,
    backend: str = "auto",
    keep_blocks: int = 0,
) -> tuple[Tensor, Tensor]:
    """``sequence_logprobs(hidden @ weight.T + bias, targets, mask)`` without the logits.

    Args:
        hidden: [N, T, H] final hidden states, already aligned with ``targets``.
        weight: [V, H] lm-head weight; ``bias`` optional [V].
        targets: [N, T] token ids; ``ignore_index`` entries are masked.
        mask: [N, T] response-token mask.
        chunk_tokens, chunk_vocab: block of logits held at once (default: 1024 x 8192 for
            ``"torch"``, 16384 x 16384 for ``"triton"``).
        backend: ``"auto"`` (Triton on CUDA, else torch), ``"torch"`` or ``"triton"``.
        keep_blocks: logit blocks the forward keeps for the backward, which then does not
            recompute them (each ``chunk_tokens x chunk_vocab`` in the hidden dtype). Trades a
            fixed amount of memory, independent of V, for part of the recompute matmul.

    Returns:
        ``(logps [N], n_tokens [N])`` fp32 (fp64 for fp64 hidden); differentiable wrt
        ``hidden``, ``weight`` and ``bias``.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [N, T, H], got {tuple(hidden.shape)}")
    backend = _resolve_backend(backend, hidden)
    if chunk_tokens is None:
        chunk_tokens = TRITON_CHUNK_TOKENS if backend == "triton" else DEFAULT_CHUNK_TOKENS
    if chunk_vocab is None:
        chunk_vocab = TRITON_CHUNK_VOCAB if backend == "triton" else DEFAULT_CHUNK_VOCAB
    valid = valid_token_mask(targets, mask, ignore_index)
    if weight.dim() == 2:  # (else the autograd function says the weight was not gathered)
        check_targets(targets, valid, weight.shape[0])
    n_tokens = valid.sum(1).to(_acc(hidden.dtype))
    logps = _FusedLinearSequenceLogprobs.apply(
        hidden,
        weight,
        bias,
        targets,
        valid,
        max(1, int(chunk_tokens)),
        max(1, int(chunk_vocab)),
        backend,
        max(0, int(keep_blocks)),
    )
    return logps, n_tokens


class FusedLMHeadLogprobs(nn.Module):
    """``forward(hidden, targets, mask) -> (logps, n_tokens)`` from ``lm_head``'s weight and bias.

    ``lm_head`` is only read, never called: the caller (``msl_ds.logprobs.install_fused_head``)
    runs this inside ``lm_head.forward``, where ZeRO-3 has gathered the weight already; called
    anywhere else under ZeRO-3, the weight would be a partition and the kernel refuses its shape.
    """

    def __init__(
        self,
        lm_head: nn.Linear,
        *,
        ignore_index: int = -100,
        chunk_tokens: int | None = None,
        chunk_vocab: int | None = None,
        backend: str = "auto",
        keep_blocks: int = 0,
    ) -> None:
        super().__init__()
        self.lm_head = lm_head
        self.ignore_index = ignore_index
        self.chunk_tokens = chunk_tokens
        self.chunk_vocab = chunk_vocab
        self.backend = backend
        self.keep_blocks = keep_blocks

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
            backend=self.backend,
            keep_blocks=self.keep_blocks,
        )
