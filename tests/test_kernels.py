"""Tests for msl_ds.kernels: chunked / Triton (interpreter) / fused-linear log-probs and the loss head.

Inputs are fresh random tensors on every run; the seed is printed (shown by pytest on
failure) and included in assertion messages.  Reproduce with ``MSL_TEST_SEED=<seed>``.

The Triton kernels run on CPU tensors through the Triton interpreter in a subprocess
(tests/scripts/triton_interp_check.py): TRITON_INTERPRET=1 must be set before
triton.language is imported, which a shared pytest process cannot guarantee.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import subprocess
import sys
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from msl_ds.kernels import (
    ROLE_ALIGNED,
    ROLE_CONFLICT,
    ROLE_GOLD,
    ROLE_IGNORE,
    FusedLMHeadLogprobs,
    LossConfig,
    chunked_sequence_logprobs,
    fused_linear_sequence_logprobs,
    preference_loss,
    preference_loss_from_logps,
    sequence_logprobs,
)
from msl_ds.kernels import triton_logprob as tlp

# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def seed():
    s = int(os.environ.get("MSL_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(s)
    print(f"MSL_TEST_SEED={s}")
    return s


def _m(info):
    """assert_close message callable: keep torch's diagnostics and append seed/case info."""
    return lambda default: f"{default}\n{info}"


def make_inputs(N, T, V, dtype, *, scale=3.0, device="cpu"):
    logits = (torch.randn(N, T, V, device=device) * scale).to(dtype)
    targets = torch.randint(0, V, (N, T), device=device)
    mask = torch.rand(N, T, device=device) > 0.3
    mask[:, 0] = False  # a prompt position
    if N > 1:
        mask[N - 1] = False  # fully masked row
    targets[0, 1] = -100  # ignored target inside the mask
    mask[0, 1] = True
    return logits, targets, mask


def ref_logprobs(logits, targets, mask, g, ignore_index=-100):
    """fp64 reference: values [N] and d(sum g*logps)/d logits."""
    x = logits.detach().double().requires_grad_()
    valid = mask.bool() & (targets != ignore_index)
    lp = torch.log_softmax(x, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    out = (lp * valid).sum(-1)
    (out * g.double()).sum().backward()
    return out.detach(), valid.sum(-1).double(), x.grad


def tol(dtype):
    # (atol on logps sums, atol on gradients relative to max|g|)
    return {torch.float64: (1e-9, 1e-12), torch.float32: (2e-4, 2e-6), torch.bfloat16: (2e-4, 2**-7)}[dtype]


def check_logprob_fn(fn, N, T, V, dtype, seed, *, inplace=False, noncontig=False):
    logits, targets, mask = make_inputs(N, T + (1 if noncontig else 0), V, dtype)
    if noncontig:  # the usual caller pattern: logits[:, :-1]
        base = logits.requires_grad_()
        x = base[:, :-1]
        targets, mask = targets[:, 1:], mask[:, 1:]
    else:
        base = x = logits.requires_grad_()
    if inplace:
        # in-place backward needs a non-leaf buffer nobody else uses
        leaf = logits.detach().clone().requires_grad_()
        x = leaf * 1.0
        base = leaf
    g = torch.randn(N, dtype=torch.float64)
    ref, ref_n, ref_grad = ref_logprobs(x, targets, mask, g)
    logps, n_tok = fn(x, targets, mask, inplace)
    assert logps.shape == (N,) and n_tok.shape == (N,)
    assert logps.dtype in (torch.float32, torch.float64)
    (logps * g.to(logps.dtype)).sum().backward()
    grad = base.grad
    if noncontig:
        grad = grad[:, :-1]
    a_lp, a_g = tol(dtype)
    msg = f"seed={seed} dtype={dtype} shape={(N, T, V)} inplace={inplace}"
    assert torch.equal(n_tok.double(), ref_n), msg
    assert torch.isfinite(logps).all() and torch.isfinite(grad).all(), msg
    torch.testing.assert_close(logps.double(), ref, atol=a_lp, rtol=1e-5, msg=_m(msg))
    torch.testing.assert_close(grad.double(), ref_grad, atol=a_g * g.abs().max().item(), rtol=0, msg=_m(msg))
    # fully masked row: exactly zero value and gradient
    assert logps[N - 1].item() == 0.0 and n_tok[N - 1].item() == 0.0, msg
    assert (grad[N - 1] == 0).all(), msg


# ----------------------------------------------------------------------------- chunked (CPU path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("inplace", [False, True])
def test_chunked_matches_fp64_reference(seed, dtype, inplace):
    def fn(x, t, m, inplace):
        return chunked_sequence_logprobs(x, t, m, inplace_backward=inplace, chunk_elems=5 * 123)

    check_logprob_fn(fn, 3, 47, 123, dtype, seed, inplace=inplace)


def test_chunked_noncontiguous_and_default_backend(seed):
    def fn(x, t, m, inplace):
        return sequence_logprobs(x, t, m, backend="auto")

    check_logprob_fn(fn, 3, 20, 77, torch.float32, seed, noncontig=True)


def test_chunked_gradcheck(seed):
    x = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (2, 5))
    m = torch.rand(2, 5) > 0.3
    assert torch.autograd.gradcheck(lambda x: chunked_sequence_logprobs(x, t, m, chunk_elems=22)[0], (x,))


def test_all_masked_batch_no_nan(seed):
    x = torch.randn(2, 4, 9, requires_grad=True)
    t = torch.randint(0, 9, (2, 4))
    m = torch.zeros(2, 4, dtype=torch.bool)
    lp, n = sequence_logprobs(x, t, m, backend="torch")
    cfg = LossConfig(nll_weight=1.0, pp_weight=1.0, np_weight=1.0, dpo=1.0, ipo=1.0, orpo=1.0, simpo=1.0)
    loss, met = preference_loss_from_logps(
        lp,
        n,
        torch.tensor([ROLE_GOLD, ROLE_ALIGNED]),
        torch.zeros(2),
        cfg,
        chosen_idx=torch.tensor([0]),
        rejected_idx=torch.tensor([1]),
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and (x.grad == 0).all()
    assert lp.abs().sum() == 0 and n.sum() == 0


def test_inplace_backward_reuses_logits_buffer(seed):
    leaf = torch.randn(2, 6, 13, requires_grad=True)
    x = leaf * 2.0
    t = torch.randint(0, 13, (2, 6))
    m = torch.ones(2, 6, dtype=torch.bool)
    ptr = x.data_ptr()
    grads = {}

    def hook(g):
        grads["ptr"] = g.data_ptr()

    x.register_hook(hook)
    sequence_logprobs(x, t, m, backend="torch", inplace_backward=True)[0].sum().backward()
    assert grads["ptr"] == ptr


# ----------------------------------------------------------------------------- Triton (interpreter)


@pytest.mark.skipif(not tlp.triton_available(), reason="triton is not importable")
def test_triton_interpreter_matches_fp64_reference(seed):
    """fp32/bf16, V=123 with BLOCK_V=32, ignore_index, fully masked rows, in-place, non-contiguous.

    Runs tests/scripts/triton_interp_check.py in a fresh process: TRITON_INTERPRET=1 has to
    be set before triton.language is imported, which cannot be guaranteed in-process.
    """
    script = os.path.join(os.path.dirname(__file__), "scripts", "triton_interp_check.py")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, script, "--seed", str(seed)], env=env, capture_output=True, text=True, timeout=600
    )
    print(proc.stdout)
    print(proc.stderr[-5000:])
    assert proc.returncode == 0, f"seed={seed}: triton interpreter checks failed:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    assert proc.stdout.count("PASS") == 12


def test_triton_requires_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, t, m = make_inputs(2, 3, 5, torch.float32)
    with pytest.raises(RuntimeError):
        sequence_logprobs(x, t, m, backend="triton")


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_gpu_targets(monkeypatch, arch):
    """Compile (no launch) both kernels to cubin for sm_80/sm_90 on this GPU-less box."""
    if not tlp.triton_available():
        pytest.skip("triton is not importable")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    try:
        out = tlp.compile_for_target(arch, dtype=torch.bfloat16, V=128256)
    except (RuntimeError, FileNotFoundError, OSError) as e:  # e.g. no ptxas in this triton wheel
        pytest.skip(f"offline Triton compilation unavailable: {e}")
    for name, compiled in out.items():
        assert "cubin" in compiled.asm, name


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_triton_cuda_matches_reference(seed, dtype, inplace):
    N, T, V = 4, 129, 32001
    logits, targets, mask = make_inputs(N, T, V, dtype, device="cuda")
    leaf = logits.requires_grad_()
    x = leaf * 1.0 if inplace else leaf
    g = torch.randn(N, dtype=torch.float64, device="cuda")
    ref, ref_n, ref_grad = ref_logprobs(x, targets, mask, g)
    lp, n = sequence_logprobs(x, targets, mask, backend="auto", inplace_backward=inplace)
    (lp * g.float()).sum().backward()
    a_lp, a_g = tol(dtype)
    torch.testing.assert_close(lp.double(), ref, atol=max(a_lp, 1e-3), rtol=1e-5, msg=_m(f"seed={seed}"))
    torch.testing.assert_close(leaf.grad.double(), ref_grad, atol=a_g * g.abs().max().item(), rtol=0)
    assert torch.equal(n.double(), ref_n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_cuda_matches_chunked_large_vocab_bf16(seed):
    """Triton vs the chunked path on a Llama-3-sized vocabulary (multi-block online logsumexp)."""
    N, T, V = 2, 64, 128256
    logits, targets, mask = make_inputs(N, T, V, torch.bfloat16, device="cuda")
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    g = torch.randn(N, device="cuda")
    lp_a, _ = sequence_logprobs(a, targets, mask, backend="triton")
    lp_b, _ = sequence_logprobs(b, targets, mask, backend="torch")
    (lp_a * g).sum().backward()
    (lp_b * g).sum().backward()
    torch.testing.assert_close(lp_a, lp_b, atol=1e-3, rtol=1e-5, msg=_m(f"seed={seed}"))
    torch.testing.assert_close(
        a.grad.float(), b.grad.float(), atol=2**-7 * g.abs().max().item(), rtol=0, msg=_m(f"seed={seed}")
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("chunk_tokens", [16, 4096])  # several token chunks (fp32 d W accumulator) / one
@pytest.mark.parametrize("keep_blocks", [0, 2])
def test_fused_linear_cuda_bf16(seed, backend, chunk_tokens, keep_blocks):
    N, T, H, V = 2, 33, 64, 1000
    hidden = torch.randn(N, T, H, device="cuda").bfloat16().requires_grad_()
    weight = (torch.randn(V, H, device="cuda") / 8).bfloat16().requires_grad_()
    targets = torch.randint(0, V, (N, T), device="cuda")
    mask = torch.rand(N, T, device="cuda") > 0.3
    lp, _ = fused_linear_sequence_logprobs(
        hidden,
        weight,
        targets,
        mask,
        chunk_tokens=chunk_tokens,
        chunk_vocab=256,
        backend=backend,
        keep_blocks=keep_blocks,
    )
    lp.sum().backward()
    h2 = hidden.detach().double().requires_grad_()
    w2 = weight.detach().double().requires_grad_()
    ref = (torch.log_softmax(h2 @ w2.T, -1).gather(-1, targets[..., None])[..., 0] * mask).sum(-1)
    ref.sum().backward()
    torch.testing.assert_close(lp.double(), ref, atol=0.1, rtol=1e-3, msg=_m(f"seed={seed}"))
    torch.testing.assert_close(hidden.grad.double(), h2.grad, atol=0.05, rtol=0.02, msg=_m(f"seed={seed}"))
    torch.testing.assert_close(weight.grad.double(), w2.grad, atol=0.05, rtol=0.02, msg=_m(f"seed={seed}"))


# ----------------------------------------------------------------------------- fused linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_matches_reference(seed, dtype, bias):
    check_fused_linear(seed, dtype, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_one_token_chunk_writes_dw_directly(seed, dtype):
    """All valid tokens in one chunk: d W is written by the matmul itself (no fp32 accumulator)."""
    check_fused_linear(seed, dtype, False, chunk_tokens=10**6, chunk_vocab=50)


@pytest.mark.parametrize("keep_blocks", [1, 3, 100])
def test_fused_linear_kept_blocks_match_recompute(seed, keep_blocks):
    """Blocks kept from forward (not recomputed in backward) give the same values and gradients."""
    check_fused_linear(seed, torch.float32, True, keep_blocks=keep_blocks)
    # the forward holds exactly min(keep, #blocks) blocks, and backward uses them all up
    h = torch.randn(2, 11, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    lp, _ = fused_linear_sequence_logprobs(
        h, w, torch.randint(0, 40, (2, 11)), torch.ones(2, 11, dtype=torch.bool), chunk_tokens=7, chunk_vocab=16,
        keep_blocks=keep_blocks,
    )  # fmt: skip
    n_blocks = math.ceil(22 / 7) * math.ceil(40 / 16)
    assert len(lp.grad_fn.kept) == min(keep_blocks, n_blocks)
    lp.sum().backward()
    assert len(lp.grad_fn.kept) == 0


def check_fused_linear(seed, dtype, bias, *, backend="torch", chunk_tokens=7, chunk_vocab=50, keep_blocks=0):
    """fused_linear_sequence_logprobs (value and every gradient) against an fp64 reference."""
    N, T, H, V = 3, 23, 16, 123
    hidden = torch.randn(N, T, H).to(dtype).requires_grad_()
    weight = (torch.randn(V, H) * 0.5).to(dtype).requires_grad_()
    b = torch.randn(V).to(dtype).requires_grad_() if bias else None
    _, targets, mask = make_inputs(N, T, 2, torch.float32)
    targets = torch.randint(0, V, (N, T)).masked_fill(targets == -100, -100)
    g = torch.randn(N, dtype=torch.float64)
    lp, n = fused_linear_sequence_logprobs(
        hidden,
        weight,
        targets,
        mask,
        bias=b,
        chunk_tokens=chunk_tokens,
        chunk_vocab=chunk_vocab,
        backend=backend,
        keep_blocks=keep_blocks,
    )
    (lp * g.to(lp.dtype)).sum().backward()
    h2 = hidden.detach().double().requires_grad_()
    w2 = weight.detach().double().requires_grad_()
    b2 = b.detach().double().requires_grad_() if bias else None
    logits = h2 @ w2.T + (b2 if bias else 0.0)
    valid = mask & (targets != -100)
    lp_ref = (torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * valid).sum(-1)
    (lp_ref * g).sum().backward()
    msg = f"seed={seed} dtype={dtype} bias={bias} backend={backend} chunks={chunk_tokens}x{chunk_vocab} keep={keep_blocks}"
    # bf16: the logits themselves are rounded to bf16 (as nn.Linear would), hence looser bounds
    a_lp, a_g = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-4, 1e-5), torch.bfloat16: (0.1, 0.05)}[dtype]
    sc = g.abs().max().item()
    torch.testing.assert_close(
        lp.double(), lp_ref.detach(), atol=a_lp, rtol=1e-3 if dtype == torch.bfloat16 else 1e-6, msg=_m(msg)
    )
    torch.testing.assert_close(
        hidden.grad.double(), h2.grad, atol=a_g * sc, rtol=0.02 if dtype == torch.bfloat16 else 0, msg=_m(msg)
    )
    torch.testing.assert_close(
        weight.grad.double(), w2.grad, atol=a_g * sc, rtol=0.02 if dtype == torch.bfloat16 else 0, msg=_m(msg)
    )
    if bias:
        torch.testing.assert_close(
            b.grad.double(), b2.grad, atol=a_g * sc, rtol=0.02 if dtype == torch.bfloat16 else 0, msg=_m(msg)
        )
    assert torch.equal(n, valid.sum(-1).to(n.dtype))
    assert (hidden.grad[N - 1] == 0).all()


def test_fused_lm_head_module_matches_linear(seed):
    lm_head = torch.nn.Linear(8, 37, bias=False)
    mod = FusedLMHeadLogprobs(lm_head, chunk_tokens=4, chunk_vocab=16)
    assert dict(mod.named_parameters()).keys() == {"lm_head.weight"}
    h = torch.randn(2, 9, 8, requires_grad=True)
    t = torch.randint(0, 37, (2, 9))
    m = torch.rand(2, 9) > 0.2
    lp, _ = mod(h, t, m)
    lp.sum().backward()
    gw, gh = lm_head.weight.grad.clone(), h.grad.clone()
    lm_head.weight.grad = None
    h.grad = None
    lp2, _ = sequence_logprobs(lm_head(h), t, m, backend="torch")
    lp2.sum().backward()
    torch.testing.assert_close(lp, lp2, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gw, lm_head.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gh, h.grad, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- loss head: direct formulas


def _direct_losses(logps, n_tok, roles, ref, w, ci, ri, cfg, token_normalizer=None):
    """Row-by-row Python transcription of the documented formulas."""
    ls = F.logsigmoid
    out = {}
    N = len(logps)
    gold = [i for i in range(N) if roles[i] == ROLE_GOLD]
    al = [i for i in range(N) if roles[i] == ROLE_ALIGNED]
    cf = [i for i in range(N) if roles[i] == ROLE_CONFLICT]
    if cfg.nll_weight:
        den = token_normalizer if token_normalizer is not None else sum(n_tok[i] for i in gold)
        out["sft"] = sum(-w[i] * logps[i] for i in gold) / max(float(den), 1.0)
    r = [logps[i] - ref[i] for i in range(N)]

    def wmean(idx, f):
        sw = sum(float(w[i]) for i in idx)
        return sum(w[i] * f(i) for i in idx) / sw if sw > 0 else logps.sum() * 0

    if cfg.pp_weight:
        out["pp"] = wmean(al, (lambda i: -r[i]) if cfg.form == "raw" else (lambda i: -ls(cfg.sigmoid_beta * r[i])))
    if cfg.np_weight:
        out["np"] = wmean(cf, (lambda i: r[i]) if cfg.form == "raw" else (lambda i: -ls(-cfg.sigmoid_beta * r[i])))
    b, lsm = cfg.paired_beta, cfg.label_smoothing
    P = len(ci)
    pw = [w[ci[p]] for p in range(P)]
    swp = sum(float(x) for x in pw)

    def pmean(f):
        return sum(pw[p] * f(int(ci[p]), int(ri[p])) for p in range(P)) / swp

    avg = [logps[i] / max(float(n_tok[i]), 1.0) for i in range(N)]
    if cfg.dpo:
        out["dpo"] = pmean(lambda c, q: -ls(b * (r[c] - r[q])) * (1 - lsm) - ls(-b * (r[c] - r[q])) * lsm)
    if cfg.ipo:
        out["ipo"] = pmean(
            lambda c, q: (r[c] / max(float(n_tok[c]), 1) - r[q] / max(float(n_tok[q]), 1) - 1 / (2 * b)) ** 2
        )
    if cfg.hinge:
        out["hinge"] = pmean(lambda c, q: torch.relu(1 - b * (r[c] - r[q])))
    if cfg.orpo:

        def l1me(x):
            return torch.log(-torch.expm1(x))

        out["orpo"] = pmean(lambda c, q: -b * ls((avg[c] - avg[q]) - (l1me(avg[c]) - l1me(avg[q]))))
    if cfg.simpo:

        def simpo(c, q):
            z = b * (avg[c] - avg[q] - cfg.simpo_gamma / b)
            return -ls(z) * (1 - lsm) - ls(-z) * lsm

        out["simpo"] = pmean(simpo)
    total = sum(cfg.weight(k) * v for k, v in out.items())
    return total, out


@pytest.mark.parametrize("form", ["raw", "sigmoid"])
@pytest.mark.parametrize("use_weights", [False, True])
def test_loss_head_matches_direct_formulas(seed, form, use_weights):
    N = 12
    logps = (-torch.rand(N, dtype=torch.float64) * 40 - 1).requires_grad_()
    n_tok = torch.randint(1, 30, (N,)).double()
    ref = logps.detach() + torch.randn(N, dtype=torch.float64)
    roles = torch.tensor(
        [
            ROLE_GOLD,
            ROLE_GOLD,
            ROLE_ALIGNED,
            ROLE_ALIGNED,
            ROLE_ALIGNED,
            ROLE_CONFLICT,
            ROLE_CONFLICT,
            ROLE_IGNORE,
            ROLE_GOLD,
            ROLE_ALIGNED,
            ROLE_CONFLICT,
            ROLE_IGNORE,
        ]
    )
    w = torch.rand(N, dtype=torch.float64) + 0.5 if use_weights else torch.ones(N, dtype=torch.float64)
    ci = torch.tensor([0, 2, 8, 4])
    ri = torch.tensor([5, 6, 10, 11])
    cfg = LossConfig(
        nll_weight=0.7,
        pp_weight=1.3,
        np_weight=0.9,
        form=form,
        sigmoid_beta=0.3,
        dpo=0.5,
        ipo=0.25,
        hinge=0.2,
        orpo=0.4,
        simpo=0.6,
        paired_beta=0.2,
        simpo_gamma=0.7,
        label_smoothing=0.1,
    )
    for tn in (None, 123.0):
        loss, met = preference_loss_from_logps(
            logps,
            n_tok,
            roles,
            ref,
            cfg,
            weights=w if use_weights else None,
            chosen_idx=ci,
            rejected_idx=ri,
            token_normalizer=tn,
        )
        (g,) = torch.autograd.grad(loss, logps)
        logps2 = logps.detach().clone().requires_grad_()
        total, parts = _direct_losses(logps2, n_tok, roles, ref, w, ci, ri, cfg, token_normalizer=tn)
        (g2,) = torch.autograd.grad(total, logps2)
        msg = f"seed={seed}"
        torch.testing.assert_close(loss, total, atol=1e-10, rtol=1e-10, msg=_m(msg))
        torch.testing.assert_close(g, g2, atol=1e-10, rtol=1e-10, msg=_m(msg))
        for k, v in parts.items():
            torch.testing.assert_close(met[f"loss/{k}"], v.detach(), atol=1e-10, rtol=1e-10, msg=_m(f"{msg} {k}"))
    assert set(k for k in met if k.startswith("loss/")) == {f"loss/{k}" for k in parts}
    r = (logps - ref).detach()
    al, cf = roles == ROLE_ALIGNED, roles == ROLE_CONFLICT
    torch.testing.assert_close(met["margin/aligned"], r[al].mean())
    torch.testing.assert_close(met["margin/conflict"], r[cf].mean())
    assert met["n/aligned"].item() == al.sum().item() and met["n/conflict"].item() == cf.sum().item()


def test_loss_head_only_active_terms_and_absent_roles(seed):
    logps = torch.randn(3, requires_grad=True)
    n = torch.tensor([3.0, 4.0, 5.0])
    roles = torch.full((3,), ROLE_GOLD)
    loss, met = preference_loss_from_logps(
        logps, n, roles, torch.zeros(3), LossConfig(nll_weight=1.0, pp_weight=1.0, np_weight=2.0)
    )
    assert {k for k in met if k.startswith("loss/")} == {"loss/sft", "loss/pp", "loss/np"}
    assert met["loss/pp"].item() == 0 and met["loss/np"].item() == 0
    assert met["margin/aligned"].item() == 0 and met["margin/conflict"].item() == 0  # no such rows
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.full((3,), -1 / 12.0))
    with pytest.raises(ValueError):
        preference_loss_from_logps(logps, n, roles, None, LossConfig(pp_weight=1.0))
    with pytest.raises(ValueError):
        preference_loss_from_logps(logps, n, roles, torch.zeros(3), LossConfig(dpo=1.0))


def test_preference_loss_end_to_end_bounded_memory_path(seed):
    """preference_loss on logits == loss head on reference log-probs (and grads)."""
    N, T, V = 6, 11, 50
    logits, targets, mask = make_inputs(N, T, V, torch.float32)
    mask[N - 1] = True
    roles = torch.tensor([ROLE_GOLD, ROLE_ALIGNED, ROLE_CONFLICT, ROLE_GOLD, ROLE_ALIGNED, ROLE_CONFLICT])
    ref = torch.randn(N) - 30
    cfg = LossConfig(nll_weight=1.0, pp_weight=0.5, np_weight=0.5, dpo=0.3)
    ci, ri = torch.tensor([1, 4]), torch.tensor([2, 5])
    x = logits.requires_grad_()
    loss, met = preference_loss(x, targets, mask, roles, ref, cfg, chosen_idx=ci, rejected_idx=ri)
    loss.backward()
    x2 = logits.detach().double().requires_grad_()
    valid = mask & (targets != -100)
    lp = (torch.log_softmax(x2, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * valid).sum(-1)
    loss2, _ = preference_loss_from_logps(
        lp, valid.sum(-1).double(), roles, ref.double(), cfg, chosen_idx=ci, rejected_idx=ri
    )
    loss2.backward()
    torch.testing.assert_close(loss.double(), loss2, atol=1e-5, rtol=1e-5, msg=_m(f"seed={seed}"))
    torch.testing.assert_close(x.grad.double(), x2.grad, atol=1e-6, rtol=1e-4, msg=_m(f"seed={seed}"))
    assert met["logps"].shape == (N,) and not met["logps"].requires_grad


# ----------------------------------------------------------------------------- loss head vs TRL

requires_trl = pytest.mark.skipif(
    importlib.util.find_spec("trl") is None, reason="trl not installed (pip install trl); it is the numerical reference"
)
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _pair_batch(B=3, L=14, V=40, dtype=torch.float64):
    """Unshifted logits/labels as TRL sees them (+ our shifted views). Rows [0,B) chosen, [B,2B) rejected."""
    logits = torch.randn(2 * B, L, V, dtype=dtype) * 2
    labels = torch.randint(0, V, (2 * B, L))
    prompt_len = torch.randint(2, 6, (2 * B,))
    for i in range(2 * B):
        labels[i, : prompt_len[i]] = -100
        labels[i, L - int(torch.randint(0, 4, ())) :] = -100  # right padding
    return logits, labels


def _ours_from_trl_layout(logits, labels):
    x = logits[:, :-1]
    tgt = labels[:, 1:]
    mask = tgt != -100
    return x, tgt, mask


@requires_trl
def test_orpo_matches_trl(seed):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    B = 3
    logits, labels = _pair_batch(B)
    beta = 0.25
    stub = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    lg_t = logits.clone().requires_grad_()
    avg = ORPOTrainer.get_batch_logps(lg_t, labels, average_log_prob=True)
    losses, *_ = ORPOTrainer.odds_ratio_loss(stub, avg[:B], avg[B:])
    # TRL ORPO total: NLL (token mean over chosen) - mean(beta * logsigmoid(log_odds))
    nll = F.cross_entropy(lg_t[:B, :-1].reshape(-1, lg_t.shape[-1]), labels[:B, 1:].reshape(-1), ignore_index=-100)
    trl_loss = nll - losses.mean()
    trl_loss.backward()

    lg_o = logits.clone().requires_grad_()
    x, tgt, mask = _ours_from_trl_layout(lg_o, labels)
    roles = torch.tensor([ROLE_GOLD] * B + [ROLE_IGNORE] * B)
    cfg = LossConfig(nll_weight=1.0, orpo=1.0, paired_beta=beta)
    loss, met = preference_loss(
        x, tgt, mask, roles, None, cfg, chosen_idx=torch.arange(B), rejected_idx=torch.arange(B, 2 * B), backend="torch"
    )
    loss.backward()
    msg = f"seed={seed}"
    # TRL's odds_ratio_loss casts to fp32, so compare at fp32 precision
    torch.testing.assert_close(met["loss/orpo"], -losses.mean().detach().double(), atol=1e-6, rtol=1e-5, msg=_m(msg))
    torch.testing.assert_close(loss, trl_loss.double(), atol=1e-6, rtol=1e-5, msg=_m(msg))
    torch.testing.assert_close(lg_o.grad, lg_t.grad, atol=1e-6, rtol=1e-4, msg=_m(msg))


def _cpo_stub(loss_type, beta, ls, gamma=0.5):
    return types.SimpleNamespace(
        loss_type=loss_type,
        beta=beta,
        label_smoothing=ls,
        simpo_gamma=gamma,
        alpha=0.0,
        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
    )


@requires_trl
@pytest.mark.parametrize("ls", [0.0, 0.15])
def test_simpo_matches_trl_cpo(seed, ls):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    B = 3
    logits, labels = _pair_batch(B)
    beta, gamma = 2.0, 0.8
    lg_t = logits.clone().requires_grad_()
    avg = CPOTrainer.get_batch_logps(lg_t, labels, average_log_prob=True)
    losses, *_ = CPOTrainer.cpo_loss(_cpo_stub("simpo", beta, ls, gamma), avg[:B], avg[B:])
    losses.mean().backward()
    lg_o = logits.clone().requires_grad_()
    x, tgt, mask = _ours_from_trl_layout(lg_o, labels)
    cfg = LossConfig(nll_weight=0.0, simpo=1.0, paired_beta=beta, simpo_gamma=gamma, label_smoothing=ls)
    loss, _ = preference_loss(
        x,
        tgt,
        mask,
        torch.full((2 * B,), ROLE_IGNORE),
        None,
        cfg,
        chosen_idx=torch.arange(B),
        rejected_idx=torch.arange(B, 2 * B),
    )
    loss.backward()
    torch.testing.assert_close(loss, losses.mean(), atol=1e-10, rtol=1e-8, msg=_m(f"seed={seed}"))
    torch.testing.assert_close(lg_o.grad, lg_t.grad, atol=1e-10, rtol=1e-7, msg=_m(f"seed={seed}"))


@requires_trl
@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0)])
def test_conservative_dpo_and_hinge_match_trl_cpo_form(seed, loss_type, ls):
    """TRL's conservative-DPO formula (CPOTrainer.cpo_loss on log-ratios pi - ref)."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    B = 4
    pi = -torch.rand(2 * B, dtype=torch.float64) * 50
    ref = pi + torch.randn(2 * B, dtype=torch.float64) * 3
    pi_t = pi.clone().requires_grad_()
    r = pi_t - ref
    losses, *_ = CPOTrainer.cpo_loss(_cpo_stub(loss_type, 0.3, ls), r[:B], r[B:])
    losses.mean().backward()
    pi_o = pi.clone().requires_grad_()
    cfg = LossConfig(
        nll_weight=0.0, paired_beta=0.3, label_smoothing=ls, **{"dpo" if loss_type == "sigmoid" else "hinge": 1.0}
    )
    loss, _ = preference_loss_from_logps(
        pi_o,
        torch.full((2 * B,), 10.0, dtype=torch.float64),
        torch.full((2 * B,), ROLE_IGNORE),
        ref,
        cfg,
        chosen_idx=torch.arange(B),
        rejected_idx=torch.arange(B, 2 * B),
    )
    loss.backward()
    torch.testing.assert_close(loss, losses.mean(), atol=1e-12, rtol=1e-10, msg=_m(f"seed={seed}"))
    torch.testing.assert_close(pi_o.grad, pi_t.grad, atol=1e-12, rtol=1e-10, msg=_m(f"seed={seed}"))


def _trl_dpo_compute_loss(logits, labels, ref_chosen, ref_rejected, loss_type, beta):
    """Run TRL's DPOTrainer._compute_loss on a stub trainer whose 'model' returns per-token logps."""
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import selective_log_softmax

    acc = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t)
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=acc,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )

    def model(labels, **kw):
        tgt = labels[:, 1:]
        lp = selective_log_softmax(logits[:, :-1], tgt.clamp(min=0)) * (tgt != -100)
        z = torch.zeros(lp.shape, dtype=lp.dtype)
        return types.SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool())

    inputs = {
        "input_ids": labels.clamp(min=0),
        "attention_mask": torch.ones_like(labels),
        "completion_mask": (labels != -100).long(),
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)


@requires_trl
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_ipo_hinge_match_trl_dpotrainer(seed, loss_type):
    B = 3
    logits, labels = _pair_batch(B)
    ref = -torch.rand(2 * B, dtype=torch.float64) * 30
    beta = 0.2
    lg_t = logits.clone().requires_grad_()
    trl_loss = _trl_dpo_compute_loss(lg_t, labels, ref[:B], ref[B:], loss_type, beta)
    trl_loss.backward()
    lg_o = logits.clone().requires_grad_()
    x, tgt, mask = _ours_from_trl_layout(lg_o, labels)
    key = {"sigmoid": "dpo", "ipo": "ipo", "hinge": "hinge"}[loss_type]
    cfg = LossConfig(nll_weight=0.0, paired_beta=beta, **{key: 1.0})
    loss, _ = preference_loss(
        x,
        tgt,
        mask,
        torch.full((2 * B,), ROLE_IGNORE),
        ref,
        cfg,
        chosen_idx=torch.arange(B),
        rejected_idx=torch.arange(B, 2 * B),
    )
    loss.backward()
    torch.testing.assert_close(loss, trl_loss, atol=1e-10, rtol=1e-8, msg=_m(f"seed={seed}"))
    torch.testing.assert_close(lg_o.grad, lg_t.grad, atol=1e-10, rtol=1e-7, msg=_m(f"seed={seed}"))


@requires_trl
def test_log1mexp_stable_and_matches_trl():
    from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp

    from msl_ds.kernels import log1mexp

    x = torch.cat([-torch.logspace(-6, 2, 200, dtype=torch.float64), torch.tensor([-math.log(2)], dtype=torch.float64)])
    torch.testing.assert_close(log1mexp(x), trl_log1mexp(x))
    y = torch.tensor([0.0, -1e-30, -50.0], requires_grad=True)
    log1mexp(y).sum().backward()
    assert torch.isfinite(y.grad).all()


# ----------------------------------------------------------------------------- edge cases (issue 17)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_tokens", [7, 10**6])
def test_fused_linear_no_valid_tokens_gives_zero_weight_grad(dtype, chunk_tokens):
    """A call without valid tokens (all prompt) still owes lm_head an exact zero gradient.

    The allocator is primed with freed blocks of the weight's size full of 1234.5, so an
    uninitialised gradient buffer shows up as those values rather than as lucky zeros.
    """
    V, H = 37, 8
    for _ in range(5):
        weight = torch.randn(V, H).to(dtype).requires_grad_()
        bias = torch.randn(V).to(dtype).requires_grad_()
        hidden = torch.randn(2, 5, H).to(dtype).requires_grad_()
        targets = torch.randint(0, V, (2, 5))
        mask = torch.zeros(2, 5, dtype=torch.bool)
        for _ in range(4):
            junk = [torch.full_like(weight, 1234.5), torch.full_like(bias, 1234.5)]
            del junk
        lp, n = fused_linear_sequence_logprobs(
            hidden, weight, targets, mask, bias=bias, chunk_tokens=chunk_tokens, chunk_vocab=16
        )
        (lp * 3.0).sum().backward()
        assert n.sum() == 0 and (lp == 0).all()
        assert (weight.grad == 0).all(), f"lm-head gradient not zero: max {weight.grad.abs().max()}"
        assert (bias.grad == 0).all() and (hidden.grad == 0).all()


def _bad_targets(V):
    t = torch.randint(0, V, (2, 6))
    m = torch.ones(2, 6, dtype=torch.bool)
    m[1, :2] = False
    return t, m


@pytest.mark.parametrize("bad", [-1, -7, 37, 1000])
def test_target_ids_out_of_range_are_refused(bad):
    """A target id outside [0, V) at a valid position is a clear error on every path (Triton would
    read out of bounds silently; the torch path used to clamp negatives to token 0)."""
    V = 37
    t, m = _bad_targets(V)
    t[0, 3] = bad
    x = torch.randn(2, 6, V, requires_grad=True)
    with pytest.raises(ValueError, match=rf"target id {bad} at row 0, position 3 is outside the vocabulary \[0, {V}\)"):
        sequence_logprobs(x, t, m, backend="torch")
    with pytest.raises(ValueError, match=rf"target id {bad} .*\[0, {V}\)"):
        fused_linear_sequence_logprobs(torch.randn(2, 6, 8), torch.randn(V, 8), t, m)
    # the same id where it is masked (a prompt position) or the ignore index is fine
    t2 = t.clone()
    t2[0, 3] = -100
    sequence_logprobs(x, t2, m, backend="torch")
    t3 = t.clone()
    t3[0, 3] = 0
    t3[1, 0] = bad
    sequence_logprobs(x, t3, m, backend="torch")
    fused_linear_sequence_logprobs(torch.randn(2, 6, 8), torch.randn(V, 8), t3, m)


def check_masked_first_block(fn, dtype, block, seed):
    """Rows whose first ``block`` vocabulary columns are all -inf (a masked-out range) must give
    finite log-probs and gradients equal to the fp64 reference (the online logsumexp starts there)."""
    N, T, V = 2, 5, 70
    x = (torch.randn(N, T, V) * 3).to(dtype)
    x[0, :, :block] = float("-inf")
    x[1, 2, : 2 * block] = float("-inf")
    targets = torch.randint(2 * block, V, (N, T))
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[1, 0] = False
    leaf = x.clone().requires_grad_()
    g = torch.randn(N, dtype=torch.float64)
    ref, _, ref_grad = ref_logprobs(leaf, targets, mask, g)
    lp, _ = fn(leaf, targets, mask)
    (lp * g.to(lp.dtype)).sum().backward()
    msg = f"seed={seed} dtype={dtype} block={block}"
    assert torch.isfinite(lp).all() and torch.isfinite(leaf.grad).all(), msg
    a_lp, a_g = tol(dtype)
    torch.testing.assert_close(lp.double(), ref, atol=a_lp, rtol=1e-5, msg=_m(msg))
    torch.testing.assert_close(leaf.grad.double(), ref_grad, atol=a_g * g.abs().max().item(), rtol=0, msg=_m(msg))


def check_fused_linear_masked_first_chunk(seed, backend, chunk_vocab=16):
    """fused-linear with a bias of -inf over the first vocabulary chunk(s): finite and exact."""
    N, T, H, V = 2, 6, 8, 53
    hidden = torch.randn(N, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    b = torch.randn(V)
    b[: 2 * chunk_vocab] = float("-inf")
    bias = b.requires_grad_()
    targets = torch.randint(2 * chunk_vocab, V, (N, T))
    mask = torch.ones(N, T, dtype=torch.bool)
    lp, _ = fused_linear_sequence_logprobs(
        hidden, weight, targets, mask, bias=bias, chunk_tokens=4, chunk_vocab=chunk_vocab, backend=backend
    )
    lp.sum().backward()
    h2, w2 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = torch.log_softmax(h2 @ w2.T + b.detach().double(), -1).gather(-1, targets[..., None])[..., 0].sum(-1)
    ref.sum().backward()
    msg = f"seed={seed} backend={backend}"
    assert torch.isfinite(lp).all() and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all(), msg
    torch.testing.assert_close(lp.double(), ref.detach(), atol=1e-4, rtol=1e-6, msg=_m(msg))
    torch.testing.assert_close(hidden.grad.double(), h2.grad, atol=1e-4, rtol=1e-4, msg=_m(msg))
    torch.testing.assert_close(weight.grad.double(), w2.grad, atol=1e-4, rtol=1e-4, msg=_m(msg))


def test_masked_first_vocab_block_torch_paths(seed):
    """The torch paths with the leading vocabulary columns at -inf (the Triton kernels are checked
    the same way through the interpreter, tests/scripts/triton_interp_check.py)."""
    check_masked_first_block(lambda x, t, m: sequence_logprobs(x, t, m, backend="torch"), torch.float32, 32, seed)
    check_fused_linear_masked_first_chunk(seed, "torch")
