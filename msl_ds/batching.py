"""Micro-batches sized in tokens (``train.max_tokens_per_micro_batch``).

``train.micro_batch_size`` counts *groups* (a gold row with its probed candidates: up to ~8 rows),
so the rows and tokens of a forward vary by an order of magnitude. With a token budget each
accumulation slot's groups are cut further, greedily and in order, into parts whose padded size
(rows x longest row, what a forward allocates) stays within the budget; a group is never split
(its rows share one loss term), so a single group above the budget is a part on its own.

The optimizer step is unchanged: every loss term is a share of the step's global normaliser, so
the parts' gradients add up to the slot's. Under ZeRO-3 every forward gathers parameters
collectively, so all ranks must run the same number of forwards: the plan is known on every
rank, each rank computes every rank's parts, and a rank with fewer parts than the most runs
*filler* forwards (its smallest group, loss times zero), marked by ``None``.
"""

from __future__ import annotations

from typing import Sequence

from msl_ds.data import Example, flatten, micro_batches


def padded_tokens(groups: Sequence[Example], packed: bool = False) -> int:
    """Tokens of the collated forward of ``groups``: rows x the longest row (padding included), or
    the sum of the rows' lengths when they are packed (``train.packing``)."""
    rows, _, _ = flatten(list(groups))
    if packed:
        return sum(len(r.input_ids) for r in rows)
    return len(rows) * max((len(r.input_ids) for r in rows), default=0)


def split_by_tokens(mb: list[int], examples: Sequence[Example], budget: int, packed: bool = False) -> list[list[int]]:
    """``mb`` (example indices) cut in order into parts of at most ``budget`` padded tokens."""
    parts: list[list[int]] = []
    cur: list[int] = []
    for i in mb:
        if cur and padded_tokens([examples[j] for j in [*cur, i]], packed) > budget:
            parts.append(cur)
            cur = []
        cur.append(i)
    if cur:
        parts.append(cur)
    return parts


def token_micro_batches(
    global_batch: list[int], micro: int, accum: int, world: int, rank: int, examples: Sequence[Example], budget: int,
    packed: bool = False,
) -> list[list[int] | None]:  # fmt: skip
    """This rank's forwards for one global batch: parts of at most ``budget`` padded tokens, as
    many on every rank (``None`` = a filler forward, see the module docstring)."""
    out: list[list[int] | None] = []
    for k in range(accum):
        per_rank = [
            split_by_tokens(micro_batches(global_batch, micro, accum, world, r)[k], examples, budget, packed)
            for r in range(world)
        ]
        mine = per_rank[rank]
        n = max(len(p) for p in per_rank)
        out += mine + [None] * (n - len(mine))
    return out


def filler(global_batch: list[int], micro: int, accum: int, world: int, rank: int, examples) -> list[int]:
    """The group a filler forward runs: this rank's smallest one of the step (its loss is zeroed)."""
    mine = [i for mb in micro_batches(global_batch, micro, accum, world, rank) for i in mb]
    return [min(mine, key=lambda i: padded_tokens([examples[i]]))]
