"""PBL through the trainer's grouped-batch path, in one process on a tiny random model.

The trainer's own code (StageTrainer, groups flattened into rows, per-micro-batch loss
weights) runs on a plain PyTorch "engine"; the loss and gradient are compared with a direct
computation of the formulas over the whole step, and L_NP is shown to push conflicting answers down.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from msl_ds.config import TrainSection, batch_shape
from msl_ds.data import Example, flatten
from msl_ds.kernels import ROLE_ALIGNED, ROLE_CONFLICT, ROLE_GOLD, LossConfig
from msl_ds.monitor import Monitor, set_progress
from msl_ds.probe import (
    agrees,
    distinct_candidates,
    label_fact,
    lexical_similarity,
    mentions,
    probe_metrics,
    subject_evidence,
)
from msl_ds.trainer import StageTrainer

V = 48


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).double()


class PlainEngine:
    """The slice of a DeepSpeed engine the trainer uses (backward scales by 1/accumulation, as DeepSpeed)."""

    def __init__(self, model, grad_accum: int, lr: float = 0.0):
        self.module, self.grad_accum = model, grad_accum
        self.opt = torch.optim.SGD(model.parameters(), lr=lr) if lr else None
        self.grads: list[dict[str, torch.Tensor]] = []

    def __call__(self, **kw):
        return self.module(**kw)

    def backward(self, loss):
        (loss / self.grad_accum).backward()

    def step(self):
        self.grads.append({n: p.grad.clone() for n, p in self.module.named_parameters()})
        if self.opt:
            self.opt.step()
        self.module.zero_grad()


def seq(rng: random.Random, prompt: list[int], n: int, role: int, ref: float) -> Example:
    ans = [rng.randrange(4, V) for _ in range(n)]
    ref = float(torch.tensor(ref, dtype=torch.float32))  # the trainer holds references in fp32
    return Example(input_ids=prompt + ans, labels=[-100] * len(prompt) + ans, row={}, role=role, ref_logp=ref)


def make_groups(n: int, seed: int = 0) -> list[Example]:
    """Groups with 0-3 candidates of mixed roles and references near the truth."""
    rng = random.Random(seed)
    groups = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(4, V) for _ in range(rng.randrange(2, 6))]
        g = seq(rng, prompt, rng.randrange(1, 4), ROLE_GOLD, rng.uniform(-12, -6))
        roles = [rng.choice([ROLE_ALIGNED, ROLE_CONFLICT]) for _ in range(rng.randrange(0, 4))]
        g.candidates = [seq(rng, prompt, rng.randrange(1, 5), r, rng.uniform(-14, -4)) for r in roles]
        groups.append(g)
    return groups


def row_logps(model, rows: list[Example]) -> torch.Tensor:
    """log p(answer | prompt) per row, one unpadded forward each: the direct computation."""
    out = []
    for r in rows:
        logits = model(input_ids=torch.tensor([r.input_ids])).logits[0, :-1]
        lp = F.log_softmax(logits.double(), -1)
        tgt = torch.tensor(r.labels[1:])
        keep = tgt != -100
        out.append(lp[keep].gather(-1, tgt[keep, None]).sum())
    return torch.stack(out)


def direct_loss(model, groups: list[Example], cfg: LossConfig) -> torch.Tensor:
    rows, chosen, rejected = flatten(groups)
    lp = row_logps(model, rows)
    ref = torch.tensor([r.ref_logp for r in rows], dtype=lp.dtype)
    role = torch.tensor([r.role for r in rows])
    ntok = torch.tensor([sum(x != -100 for x in r.labels) for r in rows], dtype=lp.dtype)
    r = lp - ref
    w = torch.tensor([x.weight for x in rows], dtype=lp.dtype)
    gold = role == ROLE_GOLD
    if cfg.loss_norm == "row":  # each row's token mean, weighted, over the step's gold rows; log-ratios per token
        loss = cfg.nll_weight * -(w[gold] * lp[gold] / ntok[gold]).sum() / gold.sum()
        rp = r / ntok
    else:
        loss = cfg.nll_weight * -(w[gold] * lp[gold]).sum() / ntok[gold].sum()
        rp = r
    al, cf = rp[role == ROLE_ALIGNED], rp[role == ROLE_CONFLICT]
    if cfg.form == "raw":
        loss = loss + cfg.pp_weight * -al.mean() + cfg.np_weight * cf.mean()
    else:
        b = cfg.sigmoid_beta
        loss = loss + cfg.pp_weight * -F.logsigmoid(b * al).mean() + cfg.np_weight * -F.logsigmoid(-b * cf).mean()
    if cfg.dpo:
        h = r[chosen] - r[rejected]
        loss = loss + cfg.dpo * -F.logsigmoid(cfg.paired_beta * h).mean()
    if cfg.ipo:
        h = r[chosen] / ntok[chosen] - r[rejected] / ntok[rejected]
        loss = loss + cfg.ipo * ((h - 1 / (2 * cfg.paired_beta)) ** 2).mean()
    if cfg.hinge:
        h = r[chosen] - r[rejected]
        loss = loss + cfg.hinge * torch.relu(1 - cfg.paired_beta * h).mean()
    return loss


def run_trainer(
    model, groups, cfg: LossConfig, micro: int, accum: int, steps: int = 1, lr: float = 0.0, budget: int = 0
):
    set_progress(False)
    plan = [list(range(len(groups)))] * steps
    train = TrainSection(micro_batch_size=micro, grad_accum=accum, log_every_steps=1, max_tokens_per_micro_batch=budget)
    engine = PlainEngine(model, batch_shape(train, 1).accum, lr)  # DeepSpeed's gradient_accumulation_steps
    trainer = StageTrainer(engine, train, groups, plan, 0, 1, Monitor("", enabled=False), lambda s: None, loss_cfg=cfg)
    stats = trainer.run()
    return engine, stats


@pytest.mark.parametrize(
    "cfg",
    [
        LossConfig(nll_weight=1.0, pp_weight=0.5, np_weight=0.7, form="raw"),
        LossConfig(nll_weight=0.3, pp_weight=1.0, np_weight=2.0, form="sigmoid", sigmoid_beta=0.5),
        LossConfig(nll_weight=1.0, np_weight=0.2, dpo=0.5, paired_beta=0.3),
        LossConfig(nll_weight=1.0, pp_weight=0.1, ipo=0.5, paired_beta=0.5),
        LossConfig(nll_weight=1.0, hinge=0.7, paired_beta=0.3),
        LossConfig(nll_weight=1.0, pp_weight=0.5, np_weight=0.7, form="raw", loss_norm="row"),
        LossConfig(
            nll_weight=0.3, pp_weight=1.0, np_weight=2.0, form="sigmoid", sigmoid_beta=0.5, loss_norm="row", hinge=0.4
        ),
    ],
    ids=["raw", "sigmoid", "dpo", "ipo", "hinge", "row-raw", "row-sigmoid-hinge"],
)
@pytest.mark.parametrize("micro, accum", [(6, 1), (2, 3), (1, 6)])
def test_grouped_loss_matches_direct_formulas(cfg, micro, accum):
    """Loss and gradient of one step equal the formulas over the whole step, however it is split."""
    groups = make_groups(6)
    plain = [g for g in groups if not g.candidates]  # augmentation rows: no candidates, their kind's weight
    assert plain
    for g in plain:
        g.weight = 0.5
    model = tiny_model()
    want = direct_loss(model, groups, cfg)
    want.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    engine, stats = run_trainer(model, groups, cfg, micro, accum)
    assert stats["train_loss"] == pytest.approx(float(want), rel=1e-9)
    for n, g in engine.grads[0].items():
        torch.testing.assert_close(g, grads[n], rtol=1e-7, atol=1e-10, msg=n)


def test_margins_are_reported():
    groups = make_groups(6)
    model = tiny_model()
    rows, _, _ = flatten(groups)
    with torch.no_grad():
        lp = row_logps(model, rows)
    r = {role: [float(lp[i]) - x.ref_logp for i, x in enumerate(rows) if x.role == role] for role in (1, 2)}
    _, stats = run_trainer(model, groups, LossConfig(pp_weight=1.0, np_weight=1.0), 2, 3)
    assert stats["margin_aligned"] == pytest.approx(sum(r[1]) / len(r[1]))
    assert stats["margin_conflict"] == pytest.approx(sum(r[2]) / len(r[2]))


def test_np_lowers_conflicting_answers():
    """A few steps with L_NP push the conflicting candidates' log-probs down, far more than SFT alone."""
    groups = make_groups(8, seed=1)
    for g in groups:
        g.candidates = [c for c in g.candidates if c.role == ROLE_CONFLICT] or g.candidates[:0]
    conflicts = [c for g in groups for c in g.candidates]
    assert len(conflicts) >= 4
    with torch.no_grad():
        before = row_logps(tiny_model(), conflicts)
    for c, lp in zip(conflicts, before):
        c.ref_logp = float(lp)  # the stage-start model is the reference
    drops = {}
    for name, cfg in {
        "sft": LossConfig(nll_weight=1.0),
        "np": LossConfig(nll_weight=1.0, np_weight=1.0, form="raw"),
    }.items():
        model = tiny_model()
        run_trainer(model, groups, cfg, 4, 1, steps=5, lr=0.5)
        with torch.no_grad():
            drops[name] = float((before - row_logps(model, conflicts)).mean())
    assert drops["np"] > 1.0, drops
    assert drops["np"] > drops["sft"] + 0.5, drops


# --------------------------------------------------------------------------- probe helpers


def test_labels_and_candidates():
    assert agrees("Pumu.", "pumu") and not agrees("", "") and not agrees("Nestol", "Pumu")
    assert label_fact("Pumu", "It is Pumu", ["Nestol"] * 4, 0.5)[0] == "known"
    assert label_fact("Pumu", "Nestol", ["Nestol", "Nestol", "Lif", "Nestol"], 0.5) == ("conflict", 0.75)
    assert label_fact("Pumu", "Nestol", ["Lif", "Ard", "Nestol", "Bo"], 0.5) == ("unknown", 0.25)
    assert label_fact("Pumu", "", ["", ""], 0.0)[0] == "unknown"
    # consistent, but the model cannot describe the subject with that answer: a guess, not a belief
    assert label_fact("Pumu", "Nestol", ["Nestol"] * 4, 0.5, described=False)[0] == "unknown"
    assert label_fact("Pumu", "Nestol", ["Nestol"] * 4, 0.5, described=True)[0] == "conflict"
    # scattered samples: a guess, unless the subject's description states the same wrong answer
    scattered = ["Lif", "Ard", "Nestol", "Bo"]
    assert label_fact("Pumu", "Nestol", scattered, 0.5, described=True)[0] == "unknown"
    assert label_fact("Pumu", "Nestol", scattered, 0.5, True, description_suffices=True) == ("conflict", 0.25)
    assert label_fact("Pumu", "Nestol", scattered, 0.5, False, description_suffices=True)[0] == "unknown"
    assert label_fact("Pumu", "Nestol", scattered, 0.5, None, description_suffices=True)[0] == "unknown"
    assert mentions("headquarters of Felstesbo: Nestol.", "nestol") and not mentions("Nestolburg", "Nestol")
    # what the description says: about the subject and stating the answer, about it and not
    # stating it, about another subject (a veto for a never-trained subject, no say for a
    # subject of earlier training rows), or no description at all
    about, other = "mayor of Karnur: Berbar.", "mayor of Kuma: Babrox."
    known = frozenset({"Karnur"})
    assert subject_evidence(about, "Karnur", "Berbar", frozenset()) is True
    assert subject_evidence(about, "Karnur", "Drulma", known) is False
    assert subject_evidence(other, "Karnur", "Berbar", frozenset()) is False
    assert subject_evidence(other, "Karnur", "Berbar", known) is None
    assert subject_evidence(None, "Karnur", "Berbar", known) is None
    consistent = ["Berbar"] * 4
    for text, subjects, label in (
        (other, frozenset(), "unknown"),
        (other, known, "conflict"),
        (about, known, "conflict"),
    ):
        assert (
            label_fact("Drulma", "Berbar", consistent, 0.5, subject_evidence(text, "Karnur", "Berbar", subjects))[0]
            == label
        )
    # distinct, most frequent first, empty answers dropped
    assert distinct_candidates("Nestol", ["Lif", "lif.", "pumu", "", "Nestol", "Lif"], 0) == ["Lif", "Nestol", "pumu"]
    assert distinct_candidates("Nestol", ["Lif", "Ard"], 1) == ["Nestol"]
    assert lexical_similarity([("a b", "a b"), ("a", "c"), ("a b", "a c")]) == pytest.approx([1.0, 0.0, 0.5])


def test_probe_metrics_against_oracle():
    def rec(label, oracle=None, roles=()):
        r = {"label": label, "candidates": [{"role": x} for x in roles]}
        if oracle is not None:
            r["oracle_conflict"] = oracle
        return r

    probed = [
        rec("conflict", True, ["conflict"]),
        rec("conflict", False),
        rec("unknown", True),
        rec("known", None, ["aligned"]),
    ]
    m = probe_metrics(probed)
    assert m["conflict_precision"] == 0.5 and m["conflict_recall"] == 0.5
    assert (m["probe_known"], m["probe_conflict"], m["probe_unknown"]) == (1, 2, 1)
    assert (m["probe_aligned"], m["probe_conflicting"], m["probe_oracle_conflicts"]) == (1, 1, 2)


def test_token_budget_gives_the_same_step():
    """train.max_tokens_per_micro_batch fills forwards by tokens (here: more, smaller ones than the
    micro-batches); the step's loss and gradient are those of the micro-batches (every term is a
    share of the global step)."""
    groups = make_groups(8, seed=3)
    cfg = LossConfig(nll_weight=1.0, pp_weight=0.3, np_weight=0.2, form="sigmoid", dpo=0.1)
    calls = []
    plain, stats = run_trainer(tiny_model(), groups, cfg, micro=4, accum=2)
    model = tiny_model()
    forward = model.forward
    model.forward = lambda **kw: (calls.append(kw["input_ids"].numel()), forward(**kw))[1]
    cut, cut_stats = run_trainer(model, groups, cfg, micro=4, accum=2, budget=40)
    assert len(calls) > 2  # more forwards than the 2 accumulation slots: the budget did cut
    assert cut_stats["train_loss"] == pytest.approx(stats["train_loss"], rel=1e-10)
    for n, g in plain.grads[0].items():
        torch.testing.assert_close(cut.grads[0][n], g, rtol=1e-9, atol=1e-12, msg=n)
