"""A step's forwards: micro-batches of groups, or forwards filled up to a token budget.

A *group* is a gold row with its probed candidates (up to ~8 rows), or a single augmentation row;
a group is never split (its rows share one loss term). Each optimizer step takes
``BatchShape.groups`` groups (``msl_ds.config.batch_shape``: ``train.global_batch_size``, the
same on any number of ranks), ``per_rank`` of them on each rank.

* ``train.max_tokens_per_micro_batch: 0``: a rank's groups are cut into ``accum`` micro-batches of
  ``train.micro_batch_size`` groups (rank-interleaved, ``data.micro_batches``), one forward each.
* ``> 0``: forwards are *filled*. The step's groups are dealt to the ranks largest first in a
  snake order, so that every rank gets a like share of tokens; each rank sorts its groups by their
  longest row and takes them into a forward until the next would push its padded size (rows x
  longest row, what a forward allocates; the rows' sum when ``train.packing``) over the budget.
  A single group above the budget is a forward of its own.

The optimizer step is the same however the groups are split: every loss term is a share of the
step's global normaliser, so the forwards' gradients add up to the step's. Under ZeRO-3 every
forward gathers parameters collectively, so all ranks must run the same number of forwards: the
plan is known on every rank, each rank computes every rank's forwards, and a rank with fewer than
the most runs *filler* forwards (its smallest group, loss times zero), marked by ``None``.
"""

from __future__ import annotations

from typing import Sequence

from msl_ds.config import BatchShape
from msl_ds.data import Example, flatten, micro_batches


def padded_tokens(groups: Sequence[Example], packed: bool = False) -> int:
    """Tokens of the collated forward of ``groups``: rows x the longest row (padding included), or
    the sum of the rows' lengths when they are packed (``train.packing``)."""
    rows, _, _ = flatten(list(groups))
    if packed:
        return sum(len(r.input_ids) for r in rows)
    return len(rows) * max((len(r.input_ids) for r in rows), default=0)


def row_lengths(group: Example) -> list[int]:
    """The token length of each row of ``group`` (gold first, then its candidates)."""
    return [len(r.input_ids) for r in group.rows()]


def deal(batch: list[int], world: int, examples: Sequence[Example], packed: bool = False) -> list[list[int]]:
    """Every rank's groups of a step (token budget): largest first, dealt in a snake order
    (0, 1, .., w-1, w-1, .., 0, ...) so that each rank's share of padded tokens is alike."""
    order = sorted(range(len(batch)), key=lambda k: (-padded_tokens([examples[batch[k]]], packed), k))
    out: list[list[int]] = [[] for _ in range(world)]
    for n, k in enumerate(order):
        r = n % world if (n // world) % 2 == 0 else world - 1 - n % world
        out[r].append(batch[k])
    return out


def fill(groups: list[int], examples: Sequence[Example], budget: int, packed: bool = False) -> list[list[int]]:
    """``groups`` (example indices) sorted by their longest row, taken into forwards of at most
    ``budget`` padded tokens (:func:`padded_tokens`; a group above it alone)."""
    lengths = {i: row_lengths(examples[i]) for i in groups}
    order = sorted(groups, key=lambda i: (-max(lengths[i]), i))
    parts: list[list[int]] = []
    cur: list[int] = []
    rows = longest = total = 0
    for i in order:
        n, top, s = len(lengths[i]), max(lengths[i]), sum(lengths[i])
        size = total + s if packed else (rows + n) * max(longest, top)
        if cur and size > budget:
            parts.append(cur)
            cur, rows, longest, total = [], 0, 0, 0
        cur.append(i)
        rows, longest, total = rows + n, max(longest, top), total + s
    if cur:
        parts.append(cur)
    return parts


def step_forwards(
    batch: list[int], shape: BatchShape, world: int, examples: Sequence[Example], packed: bool = False
) -> list[list[list[int] | None]]:
    """Every rank's forwards of one step, as many on each (``None`` = a filler forward)."""
    if shape.budget <= 0:
        return [list(micro_batches(batch, shape.micro, shape.accum, world, r)) for r in range(world)]
    per_rank: list[list[list[int] | None]] = [
        fill(g, examples, shape.budget, packed) for g in deal(batch, world, examples, packed)
    ]
    n = max(len(p) for p in per_rank)
    return [p + [None] * (n - len(p)) for p in per_rank]


def rank_forwards(
    batch: list[int], shape: BatchShape, world: int, rank: int, examples: Sequence[Example], packed: bool = False
) -> list[list[int] | None]:
    """This rank's forwards of one step (see :func:`step_forwards`)."""
    return step_forwards(batch, shape, world, examples, packed)[rank]


def filler(forwards: list[list[int] | None], examples: Sequence[Example], packed: bool = False) -> list[int]:
    """The group a filler forward runs: the smallest of this rank's step (its loss is zeroed)."""
    mine = [i for f in forwards if f is not None for i in f]
    return [min(mine, key=lambda i: (padded_tokens([examples[i]], packed), i))]
