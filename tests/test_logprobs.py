"""train.logprobs: the fused lm-head path against the logits path on a real (tiny, random) Llama.

The end-to-end check (2 DeepSpeed ranks, ZeRO-3, gradient checkpointing, stages 1-2 of the tiny
world against the session's ``msl_run``) is ``test_fused_linear_run_matches_logits_run`` in
tests/test_e2e_scale.py.
"""

from __future__ import annotations

import pytest
import torch

from msl_ds.logprobs import AnswerLogprobs, LogprobsError, resolve_mode


class Plain:
    """The engine surface AnswerLogprobs uses (``engine(...)`` and ``engine.module``), on one process."""

    def __init__(self, model):
        self.module = model

    def __call__(self, **kw):
        return self.module(**kw)


def tiny_llama(seed=0, V=97):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def batch(V=97, N=3, T=11):
    ids = torch.randint(0, V, (N, T))
    attn = torch.ones(N, T, dtype=torch.long)
    attn[2, 8:] = 0  # right padding
    labels = torch.full((N, T), -100)
    labels[:, 4:-1] = ids[:, 5:]  # answer tokens, shifted
    labels[2, 7:] = -100
    return ids, attn, labels


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_linear_matches_logits_values_and_gradients(checkpointing):
    model = tiny_llama()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, attn, labels = batch()
    g = torch.randn(3)
    grads = {}
    values = {}
    for mode in ("logits", "fused_linear"):
        model.zero_grad(set_to_none=True)
        lp, n = AnswerLogprobs(Plain(model), mode)(ids, attn, labels)
        assert lp.shape == (3,) and torch.equal(n, (labels != -100).sum(1).float())
        (lp * g).sum().backward()
        values[mode] = lp.detach()
        grads[mode] = {k: p.grad.clone() for k, p in model.named_parameters()}
    torch.testing.assert_close(values["fused_linear"], values["logits"], rtol=1e-5, atol=1e-5)
    for k in grads["logits"]:
        torch.testing.assert_close(grads["fused_linear"][k], grads["logits"][k], rtol=1e-4, atol=1e-6, msg=k)


def test_fused_head_is_plain_outside_a_call():
    """Generation and exports see the ordinary lm-head: logits [N, T, V] outside the helper."""
    model = tiny_llama()
    ids, attn, labels = batch()
    answer = AnswerLogprobs(Plain(model), "fused_linear")
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=attn).logits
        answer(ids, attn, labels)
        after = model(input_ids=ids, attention_mask=attn).logits
    assert before.shape == (3, 11, 97) and torch.equal(before, after)
    assert set(model.state_dict()) == set(tiny_llama().state_dict())  # no new names to export
    AnswerLogprobs(Plain(model), "fused_linear")  # a second helper on the same model takes over
    with torch.no_grad():
        assert answer(ids, attn, labels)[0].shape == (3,)


def scaled_head_llama(multiplier=2.0):
    """A tiny Llama whose forward multiplies the lm-head's output (Falcon-H1's ``lm_head_multiplier``)."""
    from transformers import LlamaForCausalLM

    class ScaledHeadLlama(LlamaForCausalLM):
        def forward(self, *args, **kw):
            out = super().forward(*args, **kw)
            out.logits = out.logits * multiplier
            return out

    plain = tiny_llama()
    model = ScaledHeadLlama(plain.config)
    model.load_state_dict(plain.state_dict())
    return model


def packed_batch(V=97):
    from msl_ds.data import Example
    from msl_ds.packing import collate_packed

    g = torch.Generator().manual_seed(3)
    rows = []
    for n in (7, 12, 5):
        ids = torch.randint(1, V, (n,), generator=g).tolist()
        rows.append(Example(input_ids=ids, labels=[-100] * (n // 2) + ids[n // 2 :], row={}))
    b = collate_packed(rows)
    return b["input_ids"], b["position_ids"], b["labels"], b["row_index"], len(rows)


@pytest.mark.parametrize("packed", [False, True])
def test_first_batch_check_refuses_a_head_that_scales_its_logits(packed):
    model = scaled_head_llama()
    answer = AnswerLogprobs(Plain(model), "fused_linear")
    with pytest.raises(LogprobsError, match=r"train.logprobs=fused_linear: .*differ from its lm-head's output.*"
                       r"use train.logprobs=logits"):  # fmt: skip
        answer.packed(*packed_batch()) if packed else answer(*batch())
    assert model.training  # the check ran in eval mode and put the model back


@pytest.mark.parametrize("packed", [False, True])
def test_first_batch_check_passes_a_plain_head_once(packed, caplog):
    model = tiny_llama()
    answer = AnswerLogprobs(Plain(model), "fused_linear")
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    with caplog.at_level("INFO", logger="msl_ds.logprobs"):
        for _ in range(2):
            answer.packed(*packed_batch()) if packed else answer(*batch())
    assert "agrees with the logits path on the first batch" in caplog.text
    assert len(calls) == 2 + 2  # the check's two forwards, on the first call only
    assert answer.mode == "fused_linear"


def test_auto_falls_back_to_logits_with_a_warning(monkeypatch, caplog):
    """``auto`` on CUDA takes the fused path; a failed first-batch check switches it to logits."""
    import msl_ds.logprobs as L

    real = L.resolve_mode
    monkeypatch.setattr(L, "resolve_mode", lambda mode, model, device: real(mode, model, torch.device("cuda")))
    model = scaled_head_llama()
    answer = AnswerLogprobs(Plain(model), "auto")
    assert answer.mode == "fused_linear"
    ids, attn, labels = batch()
    with caplog.at_level("WARNING", logger="msl_ds.logprobs"):
        lp, _ = answer(ids, attn, labels)
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert answer.mode == "logits" and len(warned) == 1
    assert "falling back to the logits path (train.logprobs=logits)" in warned[0].getMessage()
    with torch.no_grad():
        ref, _ = AnswerLogprobs(Plain(model), "logits")(ids, attn, labels)
    torch.testing.assert_close(lp.detach(), ref)  # the scaled model's own log-probs


def test_resolve_mode(caplog):
    model = tiny_llama()
    assert resolve_mode("auto", model, torch.device("cpu")) == "logits"
    assert resolve_mode("auto", model, torch.device("cuda")) == "fused_linear"
    assert resolve_mode("fused_linear", model, torch.device("cpu")) == "fused_linear"
    model.config.final_logit_softcapping = 30.0  # no config denylist: the first-batch check decides
    assert resolve_mode("auto", model, torch.device("cuda")) == "fused_linear"
    model.lm_head = torch.nn.Sequential(model.lm_head)  # no nn.Linear head to replace
    with caplog.at_level("WARNING", logger="msl_ds.logprobs"):
        assert resolve_mode("auto", model, torch.device("cuda")) == "logits"
    assert "train.logprobs=auto" in caplog.text and "falling back" in caplog.text
    with pytest.raises(LogprobsError, match="no nn.Linear output embedding.*use train.logprobs=logits"):
        resolve_mode("fused_linear", model, torch.device("cpu"))
    with pytest.raises(LogprobsError, match="not one of"):
        resolve_mode("fast", model, torch.device("cpu"))


def test_missing_triton_on_cuda_is_a_warning(monkeypatch, caplog):
    """Without triton, CUDA tensors take the torch kernels: said once, at WARNING."""
    import types

    import msl_ds.kernels as K

    monkeypatch.setattr(K, "triton_available", lambda: False)
    monkeypatch.setattr(K, "_warned_no_triton", [])
    cuda_like = types.SimpleNamespace(is_cuda=True)  # resolve_backend reads only .is_cuda
    with caplog.at_level("WARNING", logger="msl_ds.kernels"):
        assert K.resolve_backend(cuda_like) == "torch"
        assert K.resolve_backend(cuda_like) == "torch"
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "triton is not importable" in warned[0].getMessage()
    caplog.clear()
    assert K.resolve_backend(torch.zeros(1)) == "torch"  # a CPU tensor: the torch path is the plan
    assert not caplog.records
