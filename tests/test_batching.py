"""train.max_tokens_per_micro_batch: micro-batches cut by padded tokens, groups whole, ranks aligned."""

from __future__ import annotations

import random

import pytest

from msl_ds.batching import filler, padded_tokens, split_by_tokens, token_micro_batches
from msl_ds.data import Example, micro_batches


def group(length: int, candidates: int = 0, cand_len: int | None = None) -> Example:
    ids = list(range(length))
    cands = [Example(list(range(cand_len or length)), list(range(cand_len or length)), {}) for _ in range(candidates)]
    return Example(ids, ids, {}, candidates=cands)


def test_padded_tokens_counts_rows_times_longest_row():
    assert padded_tokens([group(10, 2, 4)]) == 3 * 10
    assert padded_tokens([group(10), group(3, 1, 20)]) == 3 * 20


def test_split_keeps_groups_whole_and_within_budget():
    ex = [group(10, 3), group(12), group(5, 7), group(40), group(8, 1)]
    parts = split_by_tokens([0, 1, 2, 3, 4], ex, budget=60)
    assert [i for p in parts for i in p] == [0, 1, 2, 3, 4]  # in order, nothing lost or repeated
    for p in parts:
        assert padded_tokens([ex[i] for i in p]) <= 60 or len(p) == 1  # over budget only alone
    assert [3] in parts  # 40 tokens alone; with any neighbour it would exceed 60
    assert split_by_tokens([0, 1, 2], ex, budget=10**9) == [[0, 1, 2]]


def test_every_rank_runs_as_many_forwards_and_covers_its_share():
    rng = random.Random(0)
    ex = [group(rng.randint(4, 60), rng.randint(0, 7), rng.randint(4, 30)) for _ in range(64)]
    micro, accum, world = 4, 2, 4
    gb = list(range(micro * accum * world))
    plans = [token_micro_batches(gb, micro, accum, world, r, ex, budget=200) for r in range(world)]
    assert len({len(p) for p in plans}) == 1 and len(plans[0]) > accum  # the budget did cut
    for r, plan in enumerate(plans):
        mine = [i for mb in micro_batches(gb, micro, accum, world, r) for i in mb]
        assert [i for p in plan if p is not None for i in p] == mine
        assert filler(gb, micro, accum, world, r, ex)[0] in mine
    assert any(p is None for plan in plans for p in plan)  # some rank needed filler forwards


def test_budget_must_be_positive_or_off():
    from msl_ds.config import ConfigError, load_config

    assert load_config(None).train.max_tokens_per_micro_batch == 0
    with pytest.raises(ConfigError, match="train.max_tokens_per_micro_batch"):
        load_config(None, ["train.max_tokens_per_micro_batch=-5"])
