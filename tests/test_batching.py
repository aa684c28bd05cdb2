"""A step's forwards: filled up to train.max_tokens_per_micro_batch (groups whole, ranks aligned),
and train.global_batch_size (the same steps on any number of ranks)."""

from __future__ import annotations

import random

import pytest

from msl_ds.batching import deal, fill, filler, padded_tokens, rank_forwards, step_forwards
from msl_ds.config import CONFIG_DIR, ConfigError, batch_shape, load_config, load_deepspeed_config
from msl_ds.data import Example, micro_batches, stage_plan


def group(length: int, candidates: int = 0, cand_len: int | None = None) -> Example:
    ids = list(range(length))
    cands = [Example(list(range(cand_len or length)), list(range(cand_len or length)), {}) for _ in range(candidates)]
    return Example(ids, ids, {}, candidates=cands)


def random_groups(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [group(rng.randint(4, 60), rng.randint(0, 7), rng.randint(4, 30)) for _ in range(n)]


def test_padded_tokens_counts_rows_times_longest_row():
    assert padded_tokens([group(10, 2, 4)]) == 3 * 10
    assert padded_tokens([group(10), group(3, 1, 20)]) == 3 * 20
    assert padded_tokens([group(10), group(3, 1, 20)], packed=True) == 10 + 3 + 20


def test_fill_takes_groups_until_the_next_would_exceed_the_budget():
    ex = [group(10, 3), group(12), group(5, 7), group(40), group(8, 1)]
    parts = fill([0, 1, 2, 3, 4], ex, budget=60)
    assert sorted(i for p in parts for i in p) == [0, 1, 2, 3, 4]  # nothing lost or repeated
    for p in parts:
        assert padded_tokens([ex[i] for i in p]) <= 60 or len(p) == 1  # over budget only alone
    # filled: no forward could have taken the next one's first group
    for a, b in zip(parts, parts[1:]):
        assert padded_tokens([ex[i] for i in [*a, b[0]]]) > 60
    assert parts[0] == [3]  # the longest row first; 40 tokens with any other group exceed 60
    assert fill([0, 1, 2], ex, budget=10**9) == [[1, 0, 2]]  # one forward, longest rows first (12, 10, 5)


def test_filled_forwards_are_fewer_than_micro_batches():
    """The point of filling: short groups share a forward instead of one forward per micro-batch."""
    ex = [group(16, 4) for _ in range(64)]  # 5 rows x 16 tokens = 80 padded tokens a group
    t = load_config(None, ["train.micro_batch_size=2", "train.global_batch_size=64"]).train
    micro = step_forwards(list(range(64)), batch_shape(t, 2), 2, ex)
    t.max_tokens_per_micro_batch = 800
    filled = step_forwards(list(range(64)), batch_shape(t, 2), 2, ex)
    assert [len(f) for f in micro] == [16, 16] and [len(f) for f in filled] == [4, 4]  # 32 groups x 80 / 800


def test_every_rank_runs_as_many_forwards_and_the_step_is_covered():
    ex = random_groups(96)
    t = load_config(None, ["train.global_batch_size=64", "train.max_tokens_per_micro_batch=400"]).train
    for world in (1, 2, 4):
        shape = batch_shape(t, world)
        batch = list(range(7, 71))
        plans = [rank_forwards(batch, shape, world, r, ex) for r in range(world)]
        assert len({len(p) for p in plans}) == 1  # as many forwards on every rank
        got = [i for plan in plans for f in plan if f is not None for i in f]
        assert sorted(got) == batch  # every group of the step once, on one rank
        assert all(len([i for f in p if f for i in f]) == 64 // world for p in plans)  # per_rank groups each
        for plan in plans:
            assert filler(plan, ex)[0] in [i for f in plan if f for i in f]
    assert any(f is None for plan in step_forwards(batch, batch_shape(t, 4), 4, ex) for f in plan)


def test_deal_balances_tokens_across_ranks():
    ex = random_groups(64, seed=1)
    shares = [sum(padded_tokens([ex[i]]) for i in g) for g in deal(list(range(64)), 4, ex)]
    assert max(shares) - min(shares) <= max(padded_tokens([e]) for e in ex)


def test_without_a_budget_forwards_are_the_micro_batches():
    t = load_config(None, ["train.micro_batch_size=4", "train.grad_accum=2"]).train
    shape = batch_shape(t, 2)
    assert (shape.groups, shape.per_rank, shape.micro, shape.accum) == (16, 8, 4, 2)
    gb = list(range(16))
    ex = random_groups(16)
    assert rank_forwards(gb, shape, 2, 1, ex) == micro_batches(gb, 4, 2, 2, 1)


@pytest.mark.parametrize("budget", [0, 300])
def test_global_batch_is_independent_of_world_size(budget):
    """train.global_batch_size: one plan (the same groups in every optimizer step) on 1, 2 and 4
    ranks, and the ranks' forwards of a step cover exactly its groups."""
    ex = random_groups(50, seed=2)
    over = ["train.global_batch_size=8", "train.micro_batch_size=2", f"train.max_tokens_per_micro_batch={budget}"]
    t = load_config(None, [*over, "train.epochs=2"]).train
    plans = {w: stage_plan(ex, t, w, seed=5) for w in (1, 2, 4)}
    assert plans[1] == plans[2] == plans[4] and all(len(s) == 8 for s in plans[1])
    for w in (1, 2, 4):
        shape = batch_shape(t, w)
        assert shape.groups == 8 and shape.per_rank * w == 8
        for step in plans[w][:5]:
            got = [i for plan in step_forwards(step, shape, w, ex) for f in plan if f is not None for i in f]
            assert sorted(got) == sorted(step)
        ds = load_deepspeed_config(load_config(CONFIG_DIR / "run_cpu_default.yaml", over), w)
        assert ds["train_batch_size"] == 8
        assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * w == 8
    # without global_batch_size the step grows with the ranks (the former rule, kept)
    legacy = load_config(None, ["train.micro_batch_size=2"]).train
    assert [batch_shape(legacy, w).groups for w in (1, 2, 4)] == [2, 4, 8]


def test_bad_batch_settings_are_refused_with_the_key():
    assert load_config(None).train.max_tokens_per_micro_batch == 0
    with pytest.raises(ConfigError, match="train.max_tokens_per_micro_batch"):
        load_config(None, ["train.max_tokens_per_micro_batch=-5"])
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        load_config(None, ["train.global_batch_size=-1"])
    with pytest.raises(ConfigError, match=r"train.grad_accum=2 with train.global_batch_size=16"):
        load_config(None, ["train.global_batch_size=16", "train.grad_accum=2"])
    t = load_config(None, ["train.global_batch_size=10", "train.micro_batch_size=2"]).train
    with pytest.raises(ConfigError, match=r"train.global_batch_size=10 does not divide over 4 ranks"):
        batch_shape(t, 4)
    with pytest.raises(
        ConfigError,
        match=r"train.global_batch_size=10 gives 5 groups per rank on 2 ranks, which train.micro_batch_size=2",
    ):
        batch_shape(t, 2)
    t.max_tokens_per_micro_batch = 1000  # filled forwards: micro_batch_size need not divide
    assert batch_shape(t, 2).per_rank == 5
    cfg = load_config(CONFIG_DIR / "run_cpu_default.yaml", ["train.global_batch_size=10"])
    with pytest.raises(ConfigError, match=r"run_cpu_default.yaml: train.global_batch_size=10 does not divide over 3"):
        load_deepspeed_config(cfg, 3)
