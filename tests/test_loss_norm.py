"""Loss normalisation per row (LossConfig.loss_norm / train.loss_norm): a stage fact's weight does not
depend on how long the other rows of its step are."""

from __future__ import annotations

import pytest
import torch

from msl_ds.kernels import ROLE_CONFLICT, ROLE_GOLD, LossConfig, preference_loss_from_logps


def grads(norm: str, long_len: int, np_weight: float = 0.0):
    """d loss / d logp of [a one-token stage answer, a long rehearsal text, a conflicting candidate]."""
    logps = torch.tensor([-2.0, -30.0, -4.0], dtype=torch.float64, requires_grad=True)
    n_tok = torch.tensor([1.0, float(long_len), 2.0 + long_len], dtype=torch.float64)
    roles = torch.tensor([ROLE_GOLD, ROLE_GOLD, ROLE_CONFLICT])
    ref = torch.tensor([-2.0, -30.0, -3.0], dtype=torch.float64)
    weights = torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64)
    cfg = LossConfig(loss_norm=norm, np_weight=np_weight, form="raw")
    loss, _ = preference_loss_from_logps(logps, n_tok, roles, ref, cfg, weights=weights)
    loss.backward()
    return logps.grad


def test_row_norm_keeps_the_stage_fact_weight():
    short, long = grads("row", 3), grads("row", 40)
    assert float(short[0]) == pytest.approx(-1 / 2) == float(long[0])  # 1 / (gold rows), whatever the lengths
    assert float(long[1]) == pytest.approx(-0.5 / (2 * 40))  # the kind's weight over its own tokens
    # the token mean lets the long text swamp the stage fact
    assert float(grads("token", 40)[0]) == pytest.approx(-1 / 41)  # over 1 + 40 gold tokens


def test_row_norm_averages_candidate_log_ratios_over_their_tokens():
    g = grads("row", 10, np_weight=1.0)
    assert float(g[2]) == pytest.approx(1.0 / 12)  # raw L_NP: d(r/n)/dlogp = 1/n
    assert float(grads("token", 10, np_weight=1.0)[2]) == pytest.approx(1.0)


def test_bad_norm_refused():
    with pytest.raises(ValueError, match="norm"):
        LossConfig(loss_norm="rows")
