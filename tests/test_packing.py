"""train.packing: rows concatenated into one sequence (position_ids restarting per row, no padding)
give the same answer log-probs, NLL losses and gradients as padded rows, on a real tiny Llama with
the installed transformers; families or attention the installed code cannot keep apart are refused."""

from __future__ import annotations

import json

import pytest
import torch
from test_logprobs import Plain, tiny_llama

from msl_ds.config import ConfigError, load_config
from msl_ds.data import Example, collate
from msl_ds.kernels import LossConfig, preference_loss_from_logps
from msl_ds.logprobs import AnswerLogprobs
from msl_ds.packing import collate_packed, packing_unsupported, packing_unsupported_model, unsupported_for_source


def rows(V=97, lengths=(7, 12, 4, 9), seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, V, (n,), generator=g).tolist()
        start = n // 2
        out.append(Example(input_ids=ids, labels=[-100] * start + ids[start:], row={}))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["logits", "fused_linear"])
def test_packed_nll_matches_padded(attn, mode):
    model = tiny_llama()
    model.config._attn_implementation = attn
    model.train()
    ex = rows()
    assert packing_unsupported_model(model) is None
    lp = AnswerLogprobs(Plain(model), mode)
    results = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        if packed:
            b = collate_packed(ex)
            assert b["input_ids"].shape == (1, sum(len(e.input_ids) for e in ex))  # no padding
            logps, n = lp.packed(b["input_ids"], b["position_ids"], b["labels"], b["row_index"], len(ex))
        else:
            b = collate(ex, pad_id=0)
            logps, n = lp(b["input_ids"], b["attention_mask"], b["labels"])
        roles = torch.zeros(len(ex), dtype=torch.long)
        loss, _ = preference_loss_from_logps(logps, n, roles, torch.zeros(len(ex)), LossConfig())
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((logps.detach(), n, loss.detach(), grads))
    (lp0, n0, l0, g0), (lp1, n1, l1, g1) = results
    assert torch.equal(n0, n1)
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-5)
    assert abs(float(l1) - float(l0)) <= 1e-5
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-5)


def test_rows_do_not_attend_across():
    """Changing the first row changes nothing of the second row's log-probs in the packed sequence."""
    model = tiny_llama().eval()
    lp = AnswerLogprobs(Plain(model), "logits")
    a, b = rows(lengths=(8, 10))
    other = Example(input_ids=[(t + 5) % 97 for t in a.input_ids], labels=a.labels, row={})
    outs = []
    for first in (a, other):
        batch = collate_packed([first, b])
        with torch.no_grad():
            outs.append(lp.packed(batch["input_ids"], batch["position_ids"], batch["labels"], batch["row_index"], 2)[0])
    assert outs[0][1] == outs[1][1] and outs[0][0] != outs[1][0]


def test_packing_refused_where_masks_are_not_transformers_own(tmp_path):
    src = "def forward(x):\n    mask = my_own_causal_mask(x)\n"
    assert "create_causal_mask" in unsupported_for_source("custom", src, "sdpa")
    assert unsupported_for_source("custom", src, "flash_attention_2") is None  # varlen from position_ids
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert packing_unsupported(str(model), "sdpa") is None
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoModel": "x.Y"}}))
    assert "trust_remote_code" in packing_unsupported(str(model), "sdpa", trust_remote_code=True)
    (model / "config.json").write_text(json.dumps({"model_type": "no_such_family"}))
    with pytest.raises(ConfigError, match="train.packing"):
        load_config(None, [f"model.path={model}", "train.packing=true"])
