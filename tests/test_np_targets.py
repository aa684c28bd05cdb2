"""What L_NP pushes down (pbl.np_scope, pbl.protect_golds, pbl.np_mask_prefix), on hand-built probe records
and a real SentencePiece tokenizer."""

from __future__ import annotations

import pytest

from msl_ds.config import PblSection
from msl_ds.data import encode_example
from msl_ds.kernels import ROLE_ALIGNED, ROLE_CONFLICT
from msl_ds.probe import GoldIndex, answer_tokens, attach_candidates, mark_push_down, mask_shared_prefix, probe_metrics

TEXTS = ["Who leads Zorvex?", "Kalin Marr", "Kalin Tosk", "What is 14 plus 41?", "55", "1957", "57"] * 30


def Pbl(**kw) -> PblSection:
    """The stale-belief settings these tests are about (opt-in: the defaults keep the measured ones)."""
    return PblSection(**{"np_scope": "stale", "protect_golds": True, "np_mask_prefix": True, **kw})


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from msl_ds.modeling import build_tokenizer, load_tokenizer

    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(TEXTS, d, vocab_size=200)
    return load_tokenizer(d)


def cand(text, role="conflict", ref=-5.0, masked=-3.0):
    return {"text": text, "role": role, "ref_logp": ref, "ref_logp_masked": masked}


def record(rid, label, greedy, candidates, answer="Kalin Marr", fact=None, previous=None):
    r = {"id": rid, "fact": fact or rid, "question": "Who leads Zorvex?", "answer": answer, "label": label}
    r.update(greedy=greedy, candidates=candidates, ref_logp=-2.0)
    if previous:
        r["previous_answer"] = previous
    return r


def probed():
    return [
        # a conflict: the stale answer (greedy + an agreeing sample), a stray guess, another fact's gold
        record(
            "a",
            "conflict",
            "Kalin Tosk",
            [cand("Kalin Tosk"), cand("Vorn"), cand("Brel"), cand("Kalin Marr", "aligned")],
            previous="Kalin Tosk",
        ),  # fmt: skip
        # a stale answer that is another fact's current gold: protected
        record("b", "conflict", "Brel", [cand("Brel"), cand("the Brel one")]),
        # not a conflict: nothing pushed under stale/conflict scope
        record("c", "unknown", "Vorn", [cand("Vorn")]),
        # "1957" holds the gold "57" of another fact only as a substring, not as a word: not protected
        record("d", "conflict", "1957", [cand("1957")], answer="1962"),
    ]


GOLDS = GoldIndex({"a": "Kalin Marr", "b": "Kalin Marr", "x": "Brel", "y": "57", "d": "1962", "c": "Kalin Marr"})


def pushed(recs):
    return {(r["id"], c["text"]) for r in recs for c in r["candidates"] if c.get("push")}


def test_stale_scope_pushes_only_the_stale_answer_and_never_a_gold():
    recs = probed()
    mark_push_down(recs, Pbl(), GOLDS)
    assert pushed(recs) == {("a", "Kalin Tosk"), ("d", "1957")}
    b = {c["text"]: c for c in recs[1]["candidates"]}
    assert b["Brel"]["protected"] and b["Brel"]["gold_of"] == ["x"] and not b["the Brel one"]["push"]
    m = probe_metrics(recs)
    assert (m["np_pushed"], m["np_pushed_stale"], m["np_pushed_gold"], m["np_protected"]) == (2, 1, 0, 2)
    assert m["np_margin_before"] == pytest.approx(-2.0 - -5.0)


def test_old_scopes_are_kept_for_the_ablation():
    recs = probed()
    mark_push_down(recs, Pbl(np_scope="all", protect_golds=False), GOLDS)
    assert len(pushed(recs)) == 7  # every conflicting candidate, golds of other facts included
    assert probe_metrics(recs)["np_pushed_gold"] == 3  # "Brel" twice, "the Brel one"
    recs = probed()
    mark_push_down(recs, Pbl(np_scope="conflict", protect_golds=False), GOLDS)
    assert ("c", "Vorn") not in pushed(recs) and ("a", "Vorn") in pushed(recs)


def test_gold_index_matches_whole_words():
    assert GOLDS.contains("it is Kalin Marr.") == ["a", "b", "c"]
    assert GOLDS.contains("1957") == [] and GOLDS.contains("in 57") == ["y"]


def test_shared_prefix_is_masked(tok):
    row = {"id": "r", "question": "Who leads Zorvex?", "answer": "Kalin Marr"}
    gold = encode_example(tok, row, 64, "error", "t")
    stale = encode_example(tok, {**row, "answer": "Kalin Tosk"}, 64, "error", "t")
    full = answer_tokens(stale)
    k = mask_shared_prefix(stale, gold)
    assert k >= 1 and answer_tokens(gold)[:k] == full[:k] and answer_tokens(gold)[k] != full[k]
    assert answer_tokens(stale) == full[k:] and len(stale.labels) == len(stale.input_ids)
    # a candidate sharing nothing keeps every token; the gold itself keeps at least its eos
    other = encode_example(tok, {**row, "answer": "55"}, 64, "error", "t")
    a, g = answer_tokens(other), answer_tokens(gold)
    common = next(i for i in range(len(a)) if a[i] != g[i])  # at most a shared leading-space piece
    assert mask_shared_prefix(other, gold) == common <= 1 and answer_tokens(other) == a[common:]
    same = encode_example(tok, row, 64, "error", "t")
    assert (
        answer_tokens(same)[-1] == tok.eos_token_id and len(answer_tokens(same)) - mask_shared_prefix(same, gold) == 1
    )


@pytest.mark.parametrize("mask", [True, False])
def test_attach_candidates_uses_marks_and_masks(tok, mask):
    recs = probed()
    pbl = Pbl(np_mask_prefix=mask)
    mark_push_down(recs, pbl, GOLDS)
    rows = [{"id": r["id"], "question": r["question"], "answer": r["answer"]} for r in recs]
    examples = [encode_example(tok, r, 64, "error", "t") for r in rows]
    attach_candidates(examples, recs, tok, 64, pbl)
    a = examples[0]
    assert [(c.role, c.ref_logp) for c in a.candidates] == [
        (ROLE_CONFLICT, -3.0 if mask else -5.0),
        (ROLE_ALIGNED, -5.0),
    ]
    stale = a.candidates[0]
    n_full = len(answer_tokens(encode_example(tok, {**rows[0], "answer": "Kalin Tosk"}, 64, "error", "t")))
    assert (len(answer_tokens(stale)) < n_full) == mask
    assert examples[1].candidates == [] and examples[2].candidates == []


def test_protected_stale_answer_can_be_pair_only(tok):
    """pbl.pair_protected: a protected stale answer is the rejected side of the margin loss, never in L_NP."""
    import torch

    from msl_ds.data import flatten
    from msl_ds.kernels import ROLE_GOLD, ROLE_IGNORE, preference_loss_from_logps
    from msl_ds.kernels import LossConfig as LC

    recs = probed()
    pbl = Pbl(pair_protected=True, paired="hinge")
    mark_push_down(recs, pbl, GOLDS)
    b = {c["text"]: c for c in recs[1]["candidates"]}
    # both agree with the stale greedy answer "Brel" and hold another fact's gold
    assert b["Brel"]["pair_only"] and not b["Brel"]["push"] and b["the Brel one"]["pair_only"]
    assert not any(c.get("pair_only") for r in recs[:1] + recs[2:] for c in r["candidates"])
    assert probe_metrics(recs)["np_pair_only"] == 2
    rows = [{"id": r["id"], "question": r["question"], "answer": r["answer"]} for r in recs]
    pairs = {}
    for paired, want in (("hinge", [(ROLE_IGNORE, -3.0)] * 2), ("none", [])):
        examples = [encode_example(tok, r, 64, "error", "t") for r in rows]
        attach_candidates(examples, recs, tok, 64, Pbl(pair_protected=True, paired=paired))
        assert [(c.role, c.ref_logp) for c in examples[1].candidates] == want
        _, chosen, rejected = flatten(examples[:2])  # a: gold, stale, aligned; b: gold (+ its stale)
        pairs[paired] = (chosen, rejected)
    assert pairs == {"hinge": ([0, 3, 3], [1, 4, 5]), "none": ([0], [1])}
    # an ignored row gets no L_NP gradient, only the pair's
    logps = torch.tensor([-2.0, -3.0], dtype=torch.float64, requires_grad=True)
    args = (logps, torch.tensor([2.0, 2.0]), torch.tensor([ROLE_GOLD, ROLE_IGNORE]), torch.tensor([-2.0, -3.0]))
    pair = {"chosen_idx": torch.tensor([0]), "rejected_idx": torch.tensor([1])}
    loss, _ = preference_loss_from_logps(*args, LC(nll_weight=0.0, np_weight=1.0, hinge=1.0, paired_beta=0.1), **pair)
    loss.backward()
    assert float(logps.grad[1]) == pytest.approx(0.1)  # d relu(1 - 0.1 h)/d logp_rejected
    logps.grad = None
    loss, _ = preference_loss_from_logps(*args, LC(nll_weight=0.0, np_weight=1.0), **pair)
    loss.backward()
    assert float(logps.grad[1]) == 0.0
