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


def test_auto_picks_logits_on_cpu_and_refuses_transformed_logits():
    model = tiny_llama()
    assert resolve_mode("auto", model, torch.device("cpu")) == "logits"
    assert resolve_mode("auto", model, torch.device("cuda")) == "fused_linear"
    model.config.final_logit_softcapping = 30.0
    assert resolve_mode("auto", model, torch.device("cuda")) == "logits"
    with pytest.raises(LogprobsError, match="final_logit_softcapping=30.0"):
        resolve_mode("fused_linear", model, torch.device("cpu"))
