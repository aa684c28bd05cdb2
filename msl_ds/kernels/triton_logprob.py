"""Triton kernels for :func:`msl_ds.kernels.sequence_logprobs`.

Forward (one program per token row ``(n, t)``)::

    valid  = mask[n, t] & targets[n, t] != ignore_index
    lse    = online logsumexp over vocab blocks of BLOCK_V (fp32 accumulation, ONE pass)
    tok    = logits[n, t, target] - lse            (0 for invalid rows)

followed by a per-sequence sum of ``tok`` over ``t`` in PyTorch ([N, T] fp32, cheap).
Invalid rows skip the vocabulary loop entirely (prompt tokens cost nothing).

Backward (one program per token row)::

    d logits[n, t, :] = g_seq[n] * valid[n, t] * (onehot(target) - exp(logits - lse))

written either into a fresh buffer or, with ``inplace_backward=True``, directly into the
logits buffer (read block -> write block, same program, so it is race free).  Invalid
rows are written with zeros without reading the logits.

Nothing of size [N, T, V] in fp32 is ever allocated; the only extra tensors are the
fp32 per-token ``lse`` / ``tok`` of size [N, T].

Triton is imported lazily, and the ``@triton.jit`` decoration happens on first use and
is cached per interpreter mode, so ``TRITON_INTERPRET=1`` may be set at any time before
the first launch (the test-suite runs these kernels on CPU tensors through the Triton
interpreter).  Row offsets are computed in int64 (N*T*V can exceed 2**31).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .chunked import check_targets

_KERNEL_CACHE: dict = {}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _build_kernels():
    import triton
    import triton.language as tl

    def _fwd_kernel(
        logits_ptr,
        targets_ptr,
        mask_ptr,
        lse_ptr,
        tok_ptr,
        T,
        V,
        stride_ln,
        stride_lt,
        stride_tn,
        stride_tt,
        stride_mn,
        stride_mt,
        ignore_index,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        n = row // T
        t = row % T
        tgt = tl.load(targets_ptr + n * stride_tn + t * stride_tt).to(tl.int64)
        m_ok = tl.load(mask_ptr + n * stride_mn + t * stride_mt)
        valid = (m_ok != 0) & (tgt != ignore_index)
        base = logits_ptr + n * stride_ln + t * stride_lt
        n_blocks = tl.where(valid, tl.cdiv(V, BLOCK_V), 0)
        cols = tl.arange(0, BLOCK_V)
        m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
        s = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), axis=0)
        # online logsumexp, one exp per element; a block may be all -inf (a masked-out
        # vocabulary range), so the running max is shifted to 0 while it is still -inf:
        # exp(m - m_new) must never see (-inf) - (-inf) = NaN
        for b in range(0, n_blocks):
            offs = b * BLOCK_V + cols
            x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
            m = m_new
        lse = tl.where(valid, m + tl.log(tl.where(valid, s, 1.0)), 0.0)
        safe_tgt = tl.where(valid, tgt, 0)
        x_t = tl.load(base + safe_tgt, mask=valid, other=0.0).to(tl.float32)
        tok = tl.where(valid, x_t - lse, 0.0)
        tl.store(lse_ptr + row, lse)
        tl.store(tok_ptr + row, tok)

    def _bwd_kernel(
        logits_ptr,
        grad_ptr,
        targets_ptr,
        mask_ptr,
        lse_ptr,
        gseq_ptr,
        T,
        V,
        stride_ln,
        stride_lt,
        stride_gn,
        stride_gt,
        stride_tn,
        stride_tt,
        stride_mn,
        stride_mt,
        ignore_index,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        n = row // T
        t = row % T
        tgt = tl.load(targets_ptr + n * stride_tn + t * stride_tt).to(tl.int64)
        m_ok = tl.load(mask_ptr + n * stride_mn + t * stride_mt)
        valid = (m_ok != 0) & (tgt != ignore_index)
        g = tl.load(gseq_ptr + n).to(tl.float32)
        g = tl.where(valid, g, 0.0)
        lse = tl.load(lse_ptr + row)
        src = logits_ptr + n * stride_ln + t * stride_lt
        dst = grad_ptr + n * stride_gn + t * stride_gt
        cols = tl.arange(0, BLOCK_V)
        v_read = tl.where(valid, V, 0)  # invalid rows: no read, just write zeros
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            inb = offs < V
            x = tl.load(src + offs, mask=offs < v_read, other=float("-inf")).to(tl.float32)
            p = tl.exp(x - lse)
            d = tl.where(offs == tgt, g, 0.0) - g * p
            d = tl.where(valid, d, 0.0)
            tl.store(dst + offs, d.to(grad_ptr.dtype.element_ty), mask=inb)

    def _chunk_fold_kernel(
        z_ptr,
        tgt_ptr,
        lse_ptr,
        xt_ptr,
        Vc,
        v0,
        stride_z,
        BLOCK_V: tl.constexpr,
    ):
        # fold one vocabulary chunk z[row, :Vc] (= logits[:, v0:v0+Vc]) into the running
        # lse[row] (logaddexp, in place) and pick the target logit if it lies in the chunk
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride_z
        cols = tl.arange(0, BLOCK_V)
        m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
        s = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), axis=0)
        for start in range(0, Vc, BLOCK_V):
            offs = start + cols
            x = tl.load(base + offs, mask=offs < Vc, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: no NaN
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
            m = m_new
        lse_c = m + tl.log(s)
        prev = tl.load(lse_ptr + row)
        top = tl.maximum(prev, lse_c)
        top = tl.where(top == float("-inf"), 0.0, top)  # both -inf (the first chunks masked out)
        tl.store(lse_ptr + row, top + tl.log(tl.exp(prev - top) + tl.exp(lse_c - top)))
        rel = tl.load(tgt_ptr + row).to(tl.int64) - v0
        inside = (rel >= 0) & (rel < Vc)
        x_t = tl.load(base + tl.where(inside, rel, 0)).to(tl.float32)
        tl.store(xt_ptr + row, x_t, mask=inside)

    def _chunk_grad_kernel(
        z_ptr,
        tgt_ptr,
        lse_ptr,
        g_ptr,
        Vc,
        v0,
        stride_z,
        BLOCK_V: tl.constexpr,
    ):
        # in place: z[row, :] <- g[row] * (onehot(tgt[row] - v0) - exp(z[row, :] - lse[row]))
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride_z
        cols = tl.arange(0, BLOCK_V)
        lse = tl.load(lse_ptr + row)
        g = tl.load(g_ptr + row).to(tl.float32)
        rel = tl.load(tgt_ptr + row).to(tl.int64) - v0
        for start in range(0, Vc, BLOCK_V):
            offs = start + cols
            inb = offs < Vc
            x = tl.load(base + offs, mask=inb, other=float("-inf")).to(tl.float32)
            d = tl.where(offs == rel, g, 0.0) - g * tl.exp(x - lse)
            tl.store(base + offs, d.to(z_ptr.dtype.element_ty), mask=inb)

    return (
        triton.jit(_fwd_kernel),
        triton.jit(_bwd_kernel),
        triton.jit(_chunk_fold_kernel),
        triton.jit(_chunk_grad_kernel),
    )


def _kernels():
    key = interpret_mode()
    if key not in _KERNEL_CACHE:
        _KERNEL_CACHE[key] = _build_kernels()
    return _KERNEL_CACHE[key]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _launch_cfg(V: int, block_v: int | None) -> tuple[int, int]:
    if block_v is None:
        block_v = min(4096, _next_pow2(V))
    block_v = max(16, _next_pow2(block_v))
    num_warps = 8 if block_v >= 2048 else 4
    return block_v, num_warps


def _check_device(t: Tensor) -> None:
    if not t.is_cuda and not interpret_mode():
        raise RuntimeError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the Triton interpreter on CPU tensors)."
        )


def _bump_version(t: Tensor) -> None:
    inc = getattr(torch.autograd.graph, "increment_version", None)
    if inc is not None:
        try:
            inc(t)
        except Exception:  # pragma: no cover
            pass


class _TritonSequenceLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, mask_u8, ignore_index, inplace_backward, block_v):
        N, T, V = logits.shape
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        fwd = _kernels()[0]
        BLOCK_V, num_warps = _launch_cfg(V, block_v)
        lse = torch.empty(N, T, dtype=torch.float32, device=logits.device)
        tok = torch.empty(N, T, dtype=torch.float32, device=logits.device)
        grid = (N * T,)
        if N * T > 0:
            fwd[grid](
                logits,
                targets,
                mask_u8,
                lse,
                tok,
                T,
                V,
                logits.stride(0),
                logits.stride(1),
                targets.stride(0),
                targets.stride(1),
                mask_u8.stride(0),
                mask_u8.stride(1),
                ignore_index,
                BLOCK_V=BLOCK_V,
                num_warps=num_warps,
            )
        logps = tok.sum(1)
        ctx.save_for_backward(logits, targets, mask_u8, lse)
        ctx.ignore_index = ignore_index
        ctx.inplace_backward = inplace_backward
        ctx.block_v = block_v
        return logps

    @staticmethod
    def backward(ctx, g_seq):
        logits, targets, mask_u8, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        N, T, V = logits.shape
        bwd = _kernels()[1]
        BLOCK_V, num_warps = _launch_cfg(V, ctx.block_v)
        grad = logits if ctx.inplace_backward else torch.empty_like(logits)
        g_seq = g_seq.float().contiguous()
        if N * T > 0:
            bwd[(N * T,)](
                logits,
                grad,
                targets,
                mask_u8,
                lse,
                g_seq,
                T,
                V,
                logits.stride(0),
                logits.stride(1),
                grad.stride(0),
                grad.stride(1),
                targets.stride(0),
                targets.stride(1),
                mask_u8.stride(0),
                mask_u8.stride(1),
                ctx.ignore_index,
                BLOCK_V=BLOCK_V,
                num_warps=num_warps,
            )
        if ctx.inplace_backward:
            _bump_version(logits)
        return grad, None, None, None, None, None


def triton_sequence_logprobs(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    block_v: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton implementation; returns ``(logps [N] fp32, n_tokens [N] fp32)``.

    ``logits`` may be any float dtype and may be non-contiguous in the first two dims
    (e.g. ``logits[:, :-1]``); the vocabulary dim must be contiguous (else a copy is made).
    """
    if not triton_available():
        raise RuntimeError("triton is not importable; use backend='torch'")
    _check_device(logits)
    if logits.dtype == torch.float64 and not interpret_mode():
        raise TypeError("triton backend supports fp32/fp16/bf16 logits; use backend='torch' for fp64")
    mask_u8 = mask.to(torch.uint8)
    if targets.dtype not in (torch.int32, torch.int64):
        targets = targets.long()
    valid = mask.bool() & (targets != ignore_index)
    check_targets(targets, valid, logits.shape[-1])
    n_tokens = valid.sum(1).float()
    logps = _TritonSequenceLogprobs.apply(logits, targets, mask_u8, int(ignore_index), bool(inplace_backward), block_v)
    return logps, n_tokens


def triton_chunk_fold_(z: Tensor, tgt: Tensor, lse: Tensor, xt: Tensor, v0: int, block_v: int | None = None) -> None:
    """Fold the logit chunk ``z [M, Vc]`` (vocabulary columns ``v0 .. v0+Vc``) into ``lse [M]``.

    In place: ``lse <- logaddexp(lse, logsumexp(z, 1))`` (start from ``-inf``) and
    ``xt[i] <- z[i, tgt[i] - v0]`` where the target lies in the chunk. fp32 ``lse`` / ``xt``,
    ``tgt [M]`` int64; ``z`` any float dtype with a contiguous last dim. Used by the fused-linear path.
    """
    M, Vc = z.shape
    if M == 0:
        return
    BLOCK_V, num_warps = _launch_cfg(Vc, block_v)
    _kernels()[2][(M,)](z, tgt, lse, xt, Vc, int(v0), z.stride(0), BLOCK_V=BLOCK_V, num_warps=num_warps)


def triton_chunk_grad_(z: Tensor, tgt: Tensor, lse: Tensor, g: Tensor, v0: int, block_v: int | None = None) -> None:
    """In place: ``z <- g[:, None] * (onehot(tgt - v0) - exp(z - lse[:, None]))`` (d loss / d logit chunk)."""
    M, Vc = z.shape
    if M == 0:
        return
    BLOCK_V, num_warps = _launch_cfg(Vc, block_v)
    _kernels()[3][(M,)](z, tgt, lse, g, Vc, int(v0), z.stride(0), BLOCK_V=BLOCK_V, num_warps=num_warps)


def compile_for_target(arch: int, *, dtype: torch.dtype = torch.bfloat16, V: int = 128256, block_v: int | None = None):
    """Compile (without launching) both kernels for ``sm_<arch>``; works without a GPU.

    Used by the test-suite to check that the kernels get through the full Triton
    pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) on a machine without CUDA.
    Returns ``{"fwd", "bwd", "fold", "grad": CompiledKernel}`` (the last two are the
    fused-linear chunk kernels).
    """
    import triton
    from triton.backends.compiler import GPUTarget

    if interpret_mode():
        raise RuntimeError("compile_for_target needs TRITON_INTERPRET unset")
    ptr = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    BLOCK_V, num_warps = _launch_cfg(V, block_v)
    fwd, bwd, fold, grad = _kernels()
    common = {"T": "i32", "V": "i32"}
    fwd_sig = {
        "logits_ptr": ptr,
        "targets_ptr": "*i64",
        "mask_ptr": "*u8",
        "lse_ptr": "*fp32",
        "tok_ptr": "*fp32",
        **common,
        "stride_ln": "i64",
        "stride_lt": "i64",
        "stride_tn": "i32",
        "stride_tt": "i32",
        "stride_mn": "i32",
        "stride_mt": "i32",
        "ignore_index": "i32",
        "BLOCK_V": "constexpr",
    }
    bwd_sig = {
        "logits_ptr": ptr,
        "grad_ptr": ptr,
        "targets_ptr": "*i64",
        "mask_ptr": "*u8",
        "lse_ptr": "*fp32",
        "gseq_ptr": "*fp32",
        **common,
        "stride_ln": "i64",
        "stride_lt": "i64",
        "stride_gn": "i64",
        "stride_gt": "i64",
        "stride_tn": "i32",
        "stride_tt": "i32",
        "stride_mn": "i32",
        "stride_mt": "i32",
        "ignore_index": "i32",
        "BLOCK_V": "constexpr",
    }
    chunk = {"z_ptr": ptr, "tgt_ptr": "*i64", "lse_ptr": "*fp32", "Vc": "i32", "v0": "i64", "stride_z": "i64"}
    fold_sig = {**chunk, "xt_ptr": "*fp32", "BLOCK_V": "constexpr"}
    grad_sig = {**chunk, "g_ptr": "*fp32", "BLOCK_V": "constexpr"}
    # keep the kernels' argument order
    fold_sig = {k: fold_sig[k] for k in ("z_ptr", "tgt_ptr", "lse_ptr", "xt_ptr", "Vc", "v0", "stride_z", "BLOCK_V")}
    grad_sig = {k: grad_sig[k] for k in ("z_ptr", "tgt_ptr", "lse_ptr", "g_ptr", "Vc", "v0", "stride_z", "BLOCK_V")}
    target = GPUTarget("cuda", int(arch), 32)
    out = {}
    for name, kern, sig in (
        ("fwd", fwd, fwd_sig),
        ("bwd", bwd, bwd_sig),
        ("fold", fold, fold_sig),
        ("grad", grad, grad_sig),
    ):
        src = triton.compiler.ASTSource(fn=kern, signature=sig, constexprs={"BLOCK_V": BLOCK_V})
        out[name] = triton.compile(src, target=target, options={"num_warps": num_warps})
    return out
