"""Fact identity and the world state: which gold is current at a stage.

Rows are phrasings of facts. A fact's key is its ``fact_id`` when the row has one, else its
``subject`` + ``relation`` when it has both; a row with neither is its own fact (keyed by its
``id``) and can never be superseded. A fact may be stated by any number of stages, with any
number of changes: the world state after stage t maps every fact key stated in the stages
up to t to the gold of the latest stage that states it. Evaluation always scores against that
state, so a model that learned an update is right on every earlier test set that asks about
the fact, and one that kept the superseded value is wrong there (and *outdated*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable


def fact_key(row: dict[str, Any]) -> str:
    """``fact_id``, else ``subject`` + ``relation``, else the row's own ``id``."""
    if row.get("fact_id"):
        return str(row["fact_id"])
    if row.get("subject") and row.get("relation"):
        return f"{row['subject']} :: {row['relation']}"
    return f"row {row['id']}"


def has_identity(row: dict[str, Any]) -> bool:
    """Whether later rows can supersede this one (it names its fact)."""
    return bool(row.get("fact_id") or (row.get("subject") and row.get("relation")))


@dataclass
class WorldState:
    """Per fact: the gold current after ``stage`` and every superseded value before it.

    Built from the rows each stage states (:meth:`build`). ``superseded`` holds the earlier
    stages' golds that differ from the current one, plus the ``previous_answer`` oracle of any
    row stating the fact (the value the fact had before the data starts, when stage 0 is absent).
    """

    stage: int
    gold: dict[str, str] = field(default_factory=dict)
    stated_at: dict[str, int] = field(default_factory=dict)
    superseded: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def build(cls, stated: Iterable[tuple[int, Iterable[dict[str, Any]]]], stage: int) -> "WorldState":
        """``stated``: ``(stage index, rows)`` pairs; only stages <= ``stage`` count, in order."""
        history: dict[str, list[tuple[int, str]]] = {}
        previous: dict[str, list[str]] = {}
        for s, rows in sorted(stated, key=lambda p: p[0]):
            if s > stage:
                continue
            for r in rows:
                k = fact_key(r)
                history.setdefault(k, []).append((s, r["answer"]))
                if r.get("previous_answer"):
                    previous.setdefault(k, []).append(r["previous_answer"])
        state = cls(stage=stage)
        for k, events in history.items():
            last = max(s for s, _ in events)
            golds = {g for s, g in events if s == last}
            if len(golds) > 1:
                raise ValueError(
                    f"fact {k!r} is stated with {len(golds)} different answers in stage {last}: {sorted(golds)}"
                )
            current = golds.pop()
            state.gold[k] = current
            state.stated_at[k] = last
            old = [g for _, g in events] + previous.get(k, [])
            seen: list[str] = []
            for g in old:
                if g != current and g not in seen:
                    seen.append(g)
            if seen:
                state.superseded[k] = seen
        return state

    def current(self, row: dict[str, Any]) -> str:
        """The row's gold in this state (its own answer for a fact the state has not seen)."""
        return self.gold.get(fact_key(row), row["answer"])

    def old_values(self, row: dict[str, Any]) -> list[str]:
        """Values the row's fact had before, as far as this state knows."""
        k = fact_key(row)
        if k in self.superseded:
            return self.superseded[k]
        prev = row.get("previous_answer")
        return [prev] if prev and prev != self.current(row) else []
