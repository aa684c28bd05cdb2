"""Loss head on per-sequence log-probabilities.

Everything here works on ``[N]`` vectors (``logps``, ``n_tokens``, ``ref_logps``, ...),
so it is cheap; the gradient ``d loss / d logps`` flows back into the fused
log-prob kernel as ``g_seq``.

Row roles (``roles [N]`` long):

* ``ROLE_GOLD`` (0): gold answer, trained with token-mean NLL (SFT).
* ``ROLE_ALIGNED`` (1): response aligned with the new stage's preference ->
  pushed *up* relative to the frozen reference (``L_PP``).
* ``ROLE_CONFLICT`` (2): response that conflicts with it -> pushed *down* (``L_NP``).
* ``ROLE_IGNORE`` (-1): row contributes to no role-based term (it may still be a
  member of a (chosen, rejected) pair).

With ``r_n = logps_n - ref_logps_n`` (log-ratio to the reference) and row weights
``w`` (default 1), the terms are (the paper's preference-based loss "PBL", plus
bounded forms):

* SFT  = sum_{gold} w * (-logps) / max(token_normalizer or sum_{gold} n_tokens, 1)
  (per-token NLL; pass ``token_normalizer`` = global number of gold tokens to
  normalise correctly across micro-batches / ranks).
* ``form="raw"``:     L_PP = -sum_{aligned} w r / sum_{aligned} w,
                          L_NP = +sum_{conflict} w r / sum_{conflict} w   (unbounded)
* ``form="sigmoid"``: L_PP = mean_w[-logsigmoid( b r)] over aligned,
                          L_NP = mean_w[-logsigmoid(-b r)] over conflict  (b = sigmoid_beta)

Paired terms over ``(chosen_idx[p], rejected_idx[p])`` follow TRL (the numerical
reference, checked in the tests against TRL 1.16):

* DPO (sigmoid, TRL's conservative DPO / CPO "sigmoid" form):
  ``h = (pi_c - ref_c) - (pi_r - ref_r)``,
  ``-logsigmoid(beta h)(1 - ls) - logsigmoid(-beta h) ls`` with ``ls = label_smoothing``.
* IPO: ``(h_avg - 1/(2 beta))^2`` where ``h_avg`` uses length-normalised log-ratios
  ``(pi - ref) / n_tokens`` (as TRL's DPOTrainer does).
* hinge: ``relu(1 - beta h)``.
* ORPO (reference free, TRL ORPOTrainer): with per-token average log-probs
  ``a = logps / n_tokens``, ``log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))``,
  loss ``= -beta * logsigmoid(log_odds)``.  Only the odds-ratio part; ORPO's NLL on the
  chosen answer is the separate SFT term (mark chosen rows ``ROLE_GOLD``).
* SimPO (reference free, TRL CPOTrainer ``loss_type="simpo"``): with average
  log-probs, ``z = (a_c - a_r) - simpo_gamma / beta``,
  ``-logsigmoid(beta z)(1 - ls) - logsigmoid(-beta z) ls`` (TRL applies label smoothing
  to SimPO too).

Pair losses are averaged over pairs, weighted by ``weights[chosen_idx]``.
Total = nll_weight*SFT + pp_weight*L_PP + np_weight*L_NP + dpo*DPO + ipo*IPO + hinge*HINGE + orpo*ORPO + simpo*SimPO;
only terms with a nonzero weight are computed.  Every computed term stays connected to
the autograd graph even when its rows are absent (it is then an exact 0 with zero
gradient), so all ranks run the same backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ROLE_IGNORE = -1
ROLE_GOLD = 0
ROLE_ALIGNED = 1
ROLE_CONFLICT = 2

_PAIR_TERMS = ("dpo", "ipo", "hinge", "orpo", "simpo")
_NEEDS_REF = ("pp", "np", "dpo", "ipo", "hinge")
# each term's weight field in LossConfig (the same names as the run config's pbl.* keys)
WEIGHT_FIELD = {"sft": "nll_weight", "pp": "pp_weight", "np": "np_weight", **{t: t for t in _PAIR_TERMS}}


@dataclass
class LossConfig:
    """Weights and hyper-parameters of :func:`preference_loss` (see module docstring)."""

    nll_weight: float = 1.0  # pbl.nll_weight (gamma): weight of NLL on gold rows
    pp_weight: float = 0.0  # pbl.pp_weight (alpha): weight of L_PP on aligned rows
    np_weight: float = 0.0  # pbl.np_weight (beta): weight of L_NP on conflict rows
    form: str = "sigmoid"  # pbl.form: "raw" | "sigmoid"
    sigmoid_beta: float = 0.1  # pbl.sigmoid_beta: b in -log sigmoid(b*r) (aligned) and -log sigmoid(-b*r) (conflict)
    dpo: float = 0.0  # paired losses on (chosen_idx, rejected_idx) pairs
    ipo: float = 0.0
    hinge: float = 0.0
    orpo: float = 0.0
    simpo: float = 0.0
    paired_beta: float = 0.1  # pbl.paired_beta: beta for dpo/ipo/hinge/orpo(lambda)/simpo
    simpo_gamma: float = 0.5
    label_smoothing: float = 0.0  # dpo (TRL's conservative DPO); also simpo, as in TRL CPO
    loss_norm: str = (
        "token"  # train.loss_norm: "token": SFT = token mean over gold rows | "row": mean of each row's own token mean
    )

    def __post_init__(self) -> None:
        if self.form not in ("raw", "sigmoid"):
            raise ValueError(f"form must be 'raw' or 'sigmoid', got {self.form!r}")
        if self.loss_norm not in ("token", "row"):
            raise ValueError(f"loss_norm must be 'token' or 'row', got {self.loss_norm!r}")
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise ValueError("label_smoothing must lie in [0, 0.5]")
        if (self.ipo or self.dpo or self.hinge or self.orpo or self.simpo) and self.paired_beta <= 0:
            raise ValueError("paired_beta must be > 0 for paired losses")

    def needs_ref(self) -> bool:
        return any(self.weight(k) != 0 for k in _NEEDS_REF)

    def needs_pairs(self) -> bool:
        return any(self.weight(k) != 0 for k in _PAIR_TERMS)

    def weight(self, term: str) -> float:
        """The weight of loss term ``term`` (``sft``, ``pp``, ``np``, ``dpo``, ...)."""
        return getattr(self, WEIGHT_FIELD[term])


def log1mexp(x: Tensor) -> Tensor:
    """Numerically stable ``log(1 - exp(x))`` for ``x <= 0`` (same branch point as TRL).

    Inputs are clamped to ``<= -1e-7`` (an average log-prob of exactly 0 only occurs for
    empty rows) so that neither the value nor the gradient of either ``where`` branch
    becomes inf/NaN.
    """
    x = x.clamp(max=-1e-7)
    t = -0.6931471805599453
    a = torch.log1p(-torch.exp(torch.clamp(x, max=t)))
    b = torch.log(-torch.expm1(torch.clamp(x, min=t)))
    return torch.where(x < t, a, b)


def _wmean(values: Tensor, sel_w: Tensor) -> Tensor:
    """sum(sel_w * values) / sum(sel_w); 0 (still graph-connected) when sum(sel_w) == 0."""
    num = (sel_w * values).sum()
    den = sel_w.sum()
    return num / torch.where(den > 0, den, torch.ones_like(den))


def preference_loss_from_logps(
    logps: Tensor,
    n_tokens: Tensor,
    roles: Tensor,
    ref_logps: Tensor | None,
    cfg: LossConfig,
    *,
    weights: Tensor | None = None,
    chosen_idx: Tensor | None = None,
    rejected_idx: Tensor | None = None,
    token_normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict]:
    """Combine per-sequence log-probs into the configured loss (see module docstring).

    Args:
        logps: [N] sum of response-token log-probs (differentiable).
        n_tokens: [N] number of response tokens per row.
        roles: [N] long, one of ROLE_* .
        ref_logps: [N] frozen reference log-prob sums (needed for pp/np/dpo/ipo/hinge).
        weights: optional [N] per-row sample weights (default 1).
        chosen_idx, rejected_idx: [P] long row indices of preference pairs.
        token_normalizer: global normaliser of the SFT term: the step's gold-token count (norm
            "token") or gold-row count (norm "row"); default: the local count.

    Returns:
        ``(loss, metrics)``; ``loss`` is a 0-dim fp32 tensor, metrics hold detached
        tensors: ``logps``, ``n_tokens``, ``loss``, ``loss/<term>`` for active terms,
        ``n/gold``, ``n/aligned``, ``n/conflict``, ``margin/aligned`` /
        ``margin/conflict`` (mean log-ratio of those rows when a reference is given;
        0 where there are no such rows), and for pair losses ``n/pairs``, ``margin/pair`` (mean h) and
        ``reward/accuracy`` (fraction of pairs with h > 0).
    """
    if logps.dim() != 1:
        raise ValueError(f"logps must be [N], got {tuple(logps.shape)}")
    dev = logps.device
    fdt = logps.dtype if logps.dtype == torch.float64 else torch.float32
    logps = logps.to(fdt)
    n_tokens = n_tokens.to(device=dev, dtype=fdt)
    roles = roles.to(dev)
    w = torch.ones_like(logps) if weights is None else weights.to(device=dev, dtype=fdt)
    if cfg.needs_ref():
        if ref_logps is None:
            raise ValueError("ref_logps is required for pp/np/dpo/ipo/hinge terms")
    r = None if ref_logps is None else logps - ref_logps.to(device=dev, dtype=fdt).detach()

    gold = (roles == ROLE_GOLD).to(fdt)
    aligned = (roles == ROLE_ALIGNED).to(fdt)
    conflict = (roles == ROLE_CONFLICT).to(fdt)

    terms: dict[str, Tensor] = {}
    total = logps.sum() * 0.0  # graph-connected zero
    # norm "row": every row counts once whatever its length (its log-prob and log-ratio are
    # averaged over its own tokens), so a long row does not outweigh a one-word answer
    per_row = cfg.loss_norm == "row"
    seq = logps / n_tokens.clamp(min=1.0) if per_row else logps
    if r is not None and per_row:
        r_pbl = r / n_tokens.clamp(min=1.0)
    else:
        r_pbl = r

    if cfg.nll_weight != 0:
        if token_normalizer is None:
            den = (gold * (torch.ones_like(n_tokens) if per_row else n_tokens)).sum()
        else:
            den = (
                token_normalizer.to(device=dev, dtype=fdt)
                if isinstance(token_normalizer, Tensor)
                else torch.full((), float(token_normalizer), dtype=fdt, device=dev)
            )
        terms["sft"] = -(gold * w * seq).sum() / den.clamp(min=1.0)

    if cfg.pp_weight != 0:
        if cfg.form == "raw":
            terms["pp"] = -_wmean(r_pbl, aligned * w)
        else:
            terms["pp"] = _wmean(-F.logsigmoid(cfg.sigmoid_beta * r_pbl), aligned * w)
    if cfg.np_weight != 0:
        if cfg.form == "raw":
            terms["np"] = _wmean(r_pbl, conflict * w)
        else:
            terms["np"] = _wmean(-F.logsigmoid(-cfg.sigmoid_beta * r_pbl), conflict * w)

    pair_metrics: dict[str, Tensor] = {}
    if cfg.needs_pairs():
        if chosen_idx is None or rejected_idx is None:
            raise ValueError("chosen_idx and rejected_idx are required for dpo/ipo/hinge/orpo/simpo")
        ci = chosen_idx.to(dev).long()
        ri = rejected_idx.to(dev).long()
        if ci.shape != ri.shape or ci.dim() != 1:
            raise ValueError("chosen_idx / rejected_idx must be 1-D and of equal length")
        pw = w[ci]
        beta = cfg.paired_beta
        ls = cfg.label_smoothing
        n_c = n_tokens[ci].clamp(min=1.0)
        n_r = n_tokens[ri].clamp(min=1.0)
        if r is not None:
            h = r[ci] - r[ri]
            pair_metrics["margin/pair"] = h.detach().mean() if ci.numel() else h.detach().sum()
            pair_metrics["reward/accuracy"] = (h.detach() > 0).to(fdt).mean() if ci.numel() else h.detach().sum()
        if cfg.dpo != 0:
            z = beta * h
            terms["dpo"] = _wmean(-F.logsigmoid(z) * (1 - ls) - F.logsigmoid(-z) * ls, pw)
        if cfg.ipo != 0:
            h_avg = r[ci] / n_c - r[ri] / n_r
            terms["ipo"] = _wmean((h_avg - 1.0 / (2.0 * beta)) ** 2, pw)
        if cfg.hinge != 0:
            terms["hinge"] = _wmean(torch.relu(1.0 - beta * h), pw)
        a_c = logps[ci] / n_c
        a_r = logps[ri] / n_r
        if cfg.orpo != 0:
            log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
            terms["orpo"] = _wmean(-beta * F.logsigmoid(log_odds), pw)
            pair_metrics["orpo/log_odds"] = log_odds.detach().mean() if ci.numel() else log_odds.detach().sum()
        if cfg.simpo != 0:
            z = beta * ((a_c - a_r) - cfg.simpo_gamma / beta)
            terms["simpo"] = _wmean(-F.logsigmoid(z) * (1 - ls) - F.logsigmoid(-z) * ls, pw)
        pair_metrics["n/pairs"] = torch.full((), float(ci.numel()), dtype=fdt, device=dev)  # no host copy

    for name, val in terms.items():
        total = total + cfg.weight(name) * val

    metrics: dict = {
        "logps": logps.detach(),
        "n_tokens": n_tokens.detach(),
        "loss": total.detach(),
    }
    for name, val in terms.items():
        metrics[f"loss/{name}"] = val.detach()
    n_gold, n_al, n_cf = gold.sum().detach(), aligned.sum().detach(), conflict.sum().detach()
    metrics["n/gold"] = n_gold
    metrics["n/aligned"] = n_al
    metrics["n/conflict"] = n_cf
    if r is not None:
        # no `if n > 0` here: reading a device value would stall the host every step; 0 without such rows
        rd = r.detach()
        metrics["margin/aligned"] = (rd * aligned).sum() / n_al.clamp(min=1.0)
        metrics["margin/conflict"] = (rd * conflict).sum() / n_cf.clamp(min=1.0)
    metrics.update(pair_metrics)
    return total, metrics


__all__ = [
    "ROLE_IGNORE",
    "ROLE_GOLD",
    "ROLE_ALIGNED",
    "ROLE_CONFLICT",
    "LossConfig",
    "WEIGHT_FIELD",
    "log1mexp",
    "preference_loss_from_logps",
]
