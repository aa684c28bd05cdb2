"""Synthetic evolving-knowledge world for multi-stage continual fine-tuning.

A *world* is a set of fictional entities (companies, people, cities, products)
whose attributes are asked about as short questions.  Stage 0 holds the base
knowledge; each later stage changes a share of the mutable facts (``conflict``
rows carrying ``previous_answer``) and introduces a few new entities (``new``
rows).  Facts that never change are collected in ``retain.jsonl``.  A small
general skill (two-digit addition) is probed by ``general.jsonl`` on items held out by
construction: the base model learns them from ``general_base.jsonl``, which only the
base builder reads; no stage file holds them, so no stage trains them, and replay and
rehearsal (which read the stage files) never see them.  Stage 0's own addition items
(other pairs) stay in its training rows as the skill's pseudo-subjects.

Design rules that the trainer and evaluator rely on (all checked in code):

* a fact changes at most ``max_changes`` times (1 in the shipped presets but ``hard``; the
  evaluator handles any number: an earlier stage's test rows are scored against the gold
  current at evaluation time, via ``fact_id``);
* per relation, no answer is a substring of another answer (case-insensitive),
  across the whole world, so substring-based scoring is unambiguous (with ``answer_pool`` the
  values are drawn from a small pool shared by many subjects: the pool is substring-free too);
* no question contains its answer (or its previous answer);
* train / valid / test phrasings are disjoint templates and disjoint strings;
* output is byte-deterministic for a given (size, seed) and written atomically.

Pure Python + stdlib only (no torch), so data generation runs anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# 2: rows carry fact_id; retain/general get valid-phrasing probes. 3: the general probe asks
# held-out addition items (general_base.jsonl teaches them to the base model only), not stage 0's
GENERATOR_VERSION = 3
RNG_STREAM = 1  # the random stream: unchanged since version 1, so the rows are the same
SPLITS: tuple[str, ...] = ("train", "valid", "test")
KINDS: tuple[str, ...] = ("base", "general", "conflict", "new", "retain")
ENTITY_TYPES: tuple[str, ...] = ("company", "person", "city", "product")
# Short subject-key prefixes used inside row ids (e.g. "co0012").
TYPE_PREFIX: dict[str, str] = {"company": "co", "person": "pe", "city": "ci", "product": "pr"}
GENERAL_RELATION = "addition"
GENERAL_PREFIX = "ad"
PROBE_PREFIX = "gp"  # the held-out items of the general probe
N_COUNTRIES = 6


# --------------------------------------------------------------------------- #
# Schema: relations, phrasings and answer vocabularies
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Relation:
    """One attribute of an entity type.

    ``value_type`` is an entity type (answer is an entity name), ``"country"``,
    ``"year"`` (4-digit, drawn from ``years``) or ``"word"`` (drawn from
    ``vocab``).  ``templates`` are question phrasings with ``{s}`` = subject;
    they are dealt to splits in order (train first, then valid, then test).
    Held-out (valid/test) phrasings change the sentence but keep a content word of
    some train phrasing (e.g. "chief executive", "born", "price band"): a model
    trained from scratch has no pretraining to tell it that "profession" means
    "occupation", so a synonym-only phrasing would test vocabulary, not knowledge.
    """

    name: str
    entity_type: str
    mutable: bool
    value_type: str
    templates: tuple[str, ...]
    vocab: tuple[str, ...] = ()
    years: tuple[int, int] = (0, 0)


PRICE_BANDS = ("budget", "economy", "midrange", "premium", "luxury")
OCCUPATIONS = ("architect", "baker", "pilot", "surgeon", "teacher", "lawyer", "chemist", "sculptor", "sailor", "farmer")
INDUSTRIES = ("mining", "shipping", "banking", "textiles", "software", "aviation", "brewing", "robotics")
CATEGORIES = (
    "headphones",
    "bicycle",
    "kettle",
    "lantern",
    "scooter",
    "backpack",
    "camera",
    "blender",
    "telescope",
    "wristwatch",
)

RELATIONS: tuple[Relation, ...] = (
    Relation(
        "chief_executive",
        "company",
        True,
        "person",
        (
            "Who is the chief executive of {s}?",
            "Which person leads {s}?",
            "{s} is run by which chief executive?",
            "Who heads {s} as chief executive?",
            "Name the current chief executive of {s}.",
            "Who is the chief executive in charge of {s}?",
        ),
    ),
    Relation(
        "headquarters",
        "company",
        True,
        "city",
        (
            "In which city is {s} headquartered?",
            "Where are the headquarters of {s}?",
            "{s} has its head office in which city?",
            "Which city hosts the main office of {s}?",
            "Name the city where {s} has its headquarters.",
            "What city is home to the headquarters of {s}?",
        ),
    ),
    Relation(
        "founding_year",
        "company",
        False,
        "year",
        (
            "In what year was {s} founded?",
            "When was {s} established?",
            "{s} was founded in which year?",
            "What is the founding year of {s}?",
            "Name the year {s} was founded.",
            "Which year was {s} established in?",
        ),
        years=(1850, 1979),
    ),
    Relation(
        "industry",
        "company",
        False,
        "word",
        (
            "Which industry does {s} operate in?",
            "What sector is {s} part of?",
            "{s} belongs to which industry?",
            "What line of business is {s} in, by industry?",
            "Name the industry of {s}.",
            "What industry is {s} in?",
        ),
        vocab=INDUSTRIES,
    ),
    Relation(
        "birth_year",
        "person",
        False,
        "year",
        (
            "In what year was {s} born?",
            "When was {s} born?",
            "{s} was born in which year?",
            "What is the birth year of {s}?",
            "Name the year {s} was born.",
            "Which year was {s} born in?",
        ),
        years=(1930, 1999),
    ),
    Relation(
        "home_city",
        "person",
        False,
        "city",
        (
            "In which city did {s} grow up?",
            "What is the home city of {s}?",
            "{s} comes from which city?",
            "Which city does {s} come from originally?",
            "Name the home city of {s}.",
            "Which city did {s} grow up in?",
        ),
    ),
    Relation(
        "occupation",
        "person",
        True,
        "word",
        (
            "What is the occupation of {s}?",
            "What does {s} do for a living?",
            "{s} works in which profession?",
            "What occupation does {s} work in?",
            "Name the occupation of {s}.",
            "Which profession does {s} work in?",
        ),
        vocab=OCCUPATIONS,
    ),
    Relation(
        "country",
        "city",
        False,
        "country",
        (
            "In which country is {s} located?",
            "{s} lies in which country?",
            "What country does {s} belong to?",
            "Which country is {s} part of?",
            "Name the country that contains {s}.",
            "{s} is a city in which country?",
        ),
    ),
    Relation(
        "mayor",
        "city",
        True,
        "person",
        (
            "Who is the mayor of {s}?",
            "Which person governs {s} as mayor?",
            "{s} is led by which mayor?",
            "Who holds the office of mayor in {s}?",
            "Name the current mayor of {s}.",
            "Who serves as mayor of {s}?",
        ),
    ),
    Relation(
        "maker",
        "product",
        True,
        "company",
        (
            "Which company makes {s}?",
            "Who manufactures {s}?",
            "{s} is produced by which company?",
            "What company builds {s}?",
            "Name the company that makes {s}.",
            "Which company is behind {s}?",
        ),
    ),
    Relation(
        "price_band",
        "product",
        True,
        "word",
        (
            "In which price band is {s} sold?",
            "How is {s} priced?",
            "{s} falls into which price band?",
            "What price band does {s} belong to?",
            "Name the price band of {s}.",
            "What price band is {s} in?",
        ),
        vocab=PRICE_BANDS,
    ),
    Relation(
        "launch_year",
        "product",
        False,
        "year",
        (
            "In what year was {s} launched?",
            "When did {s} first go on sale?",
            "{s} was released in which year?",
            "What is the launch year of {s}?",
            "Name the year {s} was launched.",
            "Which year was {s} launched in?",
        ),
        years=(1960, 2019),
    ),
    Relation(
        "category",
        "product",
        False,
        "word",
        (
            "What kind of product is {s}?",
            "What type of item is {s}?",
            "{s} is what sort of product?",
            "Which kind of product is {s}?",
            "Name the kind of product that {s} is.",
            "{s} is which type of item?",
        ),
        vocab=CATEGORIES,
    ),
)
RELATION_BY_NAME: dict[str, Relation] = {r.name: r for r in RELATIONS}

GENERAL_TEMPLATES: tuple[str, ...] = (
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "{a} + {b} = ?",
    "What do you get if you add {a} and {b}?",
    "How much is {a} plus {b}?",
    "Work out {a} + {b}.",
)

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr", "st")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "", "n", "r", "l", "s", "x")


# --------------------------------------------------------------------------- #
# Sizes and the in-memory world
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class WorldSize:
    """Size knobs of a world.

    ``entities_per_type`` named entities of each type exist at stage 0 (they
    are the answer pool for entity-valued relations); the first
    ``subjects_per_type`` of them also carry facts of their own.  Per update
    stage, ``change_frac`` of the still-unchanged, unreserved mutable facts
    change and ``round(new_frac * stage-0 subjects)`` (at least 1) brand-new
    entities appear with all their relations.  ``retain_frac`` of the stage-0
    *mutable* facts is reserved up front as never-updated (fixed relations
    never change anyway).
    """

    entities_per_type: int
    subjects_per_type: int
    change_frac: float = 0.12
    new_frac: float = 0.05
    retain_frac: float = 0.25
    n_general: int = 60
    n_stages: int = 7
    n_train_phrasings: int = 3
    n_valid_phrasings: int = 1
    n_test_phrasings: int = 2
    # harder worlds (all off by default; the shipped presets but ``hard`` keep their rows byte for byte)
    answer_pool: int = 0  # > 0: each relation's values come from this many values shared by all subjects
    max_changes: int = 1  # how many times one fact may change across the stages
    persistence: float = 0.0  # > 0: old values of facts that change later are stated in more stage-0 contexts

    def split_indices(self) -> dict[str, list[int]]:
        """Template indices per split: first train, then valid, then test."""
        n = (self.n_train_phrasings, self.n_valid_phrasings, self.n_test_phrasings)
        bounds = [0, n[0], n[0] + n[1], n[0] + n[1] + n[2]]
        return {s: list(range(bounds[i], bounds[i + 1])) for i, s in enumerate(SPLITS)}


SIZES: dict[str, WorldSize] = {
    # tests: 5 subjects/type * 13 relations = 65 facts -> 195 + 60 stage-0 train lines
    "tiny": WorldSize(entities_per_type=12, subjects_per_type=5, n_general=20),
    "small": WorldSize(entities_per_type=24, subjects_per_type=9, n_general=40),
    # 15 subjects/type * 13 relations = 195 stage-0 facts, 48 names per type
    "default": WorldSize(entities_per_type=48, subjects_per_type=15, n_general=60),
    # 46 subjects/type * 13 relations = 598 stage-0 facts; answers from a pool of 12 values per
    # relation; facts change up to 3 times; old values persist (see ``persistence``)
    "hard": WorldSize(
        entities_per_type=60, subjects_per_type=46, n_general=60, answer_pool=12, max_changes=3, persistence=1.0
    ),
}


@dataclass
class World:
    """A generated world: ``stages[t][split]`` rows, retain/general rows, metadata."""

    stages: list[dict[str, list[dict[str, Any]]]]
    retain: list[dict[str, Any]]
    general: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    retain_valid: list[dict[str, Any]] = field(default_factory=list)  # the probes in valid phrasings
    general_valid: list[dict[str, Any]] = field(default_factory=list)
    general_base: list[dict[str, Any]] = field(default_factory=list)  # the probe items' train phrasings: base only


@dataclass
class _Entity:
    key: str
    name: str
    etype: str
    introduced: int
    is_subject: bool


@dataclass
class _Fact:
    entity: _Entity
    relation: Relation
    initial: str
    introduced: int
    reserved: bool = False
    changes: list[tuple[int, str]] = field(default_factory=list)  # (stage, new value), in stage order

    @property
    def changed_at(self) -> int | None:
        """The stage of the first change (None: the fact never changes)."""
        return self.changes[0][0] if self.changes else None

    def value_at(self, stage: int) -> str:
        """Value of the fact as known after training on ``stage``."""
        value = self.initial
        for s, v in self.changes:
            if s <= stage:
                value = v
        return value


# --------------------------------------------------------------------------- #
# Generation
# --------------------------------------------------------------------------- #
def _resolve_size(size: str | WorldSize) -> tuple[str, WorldSize]:
    """Map a preset name or explicit WorldSize to (name, WorldSize)."""
    if isinstance(size, WorldSize):
        return "custom", size
    if size not in SIZES:
        raise ValueError(f"unknown world size {size!r}; choose from {sorted(SIZES)}")
    return size, SIZES[size]


def _n_new_per_stage(ws: WorldSize) -> int:
    """New entities per update stage (at least one)."""
    return max(1, round(ws.new_frac * ws.subjects_per_type * len(ENTITY_TYPES)))


def _forbidden_fragments() -> tuple[list[str], list[str]]:
    """Words a name must not clash with: (vocab words, lower-cased template texts).

    A name must neither contain nor be contained in a vocab word (either could
    put an answer inside a question), and must not occur inside template text.
    """
    vocab = [w.lower() for r in RELATIONS for w in r.vocab]
    texts = [t.lower() for r in RELATIONS for t in r.templates]
    return vocab, texts


def _make_names(rng: random.Random, n: int) -> list[str]:
    """Draw ``n`` distinct pronounceable names, none a substring of another.

    Why: names are both subjects and answers; substring-freeness keeps
    substring-based answer matching unambiguous and keeps answers out of
    questions.
    """
    vocab, texts = _forbidden_fragments()
    names: list[str] = []
    lowered: list[str] = []
    for _ in range(200 * n):
        if len(names) == n:
            break
        n_syl = 2 if rng.random() < 0.8 else 3
        cand = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n_syl))
        low = cand.lower()
        if len(low) < 4 or any(low in o or o in low for o in lowered):
            continue
        if any(low in w or w in low for w in vocab) or any(low in t for t in texts):
            continue
        names.append(cand.capitalize())
        lowered.append(low)
    if len(names) != n:
        raise RuntimeError(f"could only draw {len(names)} of {n} substring-free names")
    return names


def _make_entities(rng: random.Random, ws: WorldSize) -> tuple[dict[str, list[_Entity]], list[str]]:
    """Create all entities (stage-0 pool + reserve for later stages) and countries.

    Returns (entities per type in creation order, country names).  Reserved
    entities get ``introduced = -1`` until a stage picks them.
    """
    reserve = ws.n_stages * _n_new_per_stage(ws)
    per_type = ws.entities_per_type + reserve
    names = _make_names(rng, per_type * len(ENTITY_TYPES) + N_COUNTRIES)
    countries = names[:N_COUNTRIES]
    by_type: dict[str, list[_Entity]] = {}
    for t_i, etype in enumerate(ENTITY_TYPES):
        chunk = names[N_COUNTRIES + t_i * per_type : N_COUNTRIES + (t_i + 1) * per_type]
        by_type[etype] = [
            _Entity(
                key=f"{TYPE_PREFIX[etype]}{i:04d}",
                name=name,
                etype=etype,
                introduced=0 if i < ws.entities_per_type else -1,
                is_subject=i < ws.subjects_per_type,
            )
            for i, name in enumerate(chunk)
        ]
    return by_type, countries


def _alive(by_type: dict[str, list[_Entity]], etype: str, stage: int) -> list[str]:
    """Names of entities of ``etype`` that exist at ``stage`` (answer pool)."""
    return [e.name for e in by_type[etype] if 0 <= e.introduced <= stage]


def _value_pool(rel: Relation, by_type: dict[str, list[_Entity]], countries: list[str], stage: int, size: int) -> list:
    """The values ``rel`` may take at ``stage``; with ``size`` > 0 only the first ``size`` of them
    (a small pool shared by all subjects: years spread evenly over the relation's range)."""
    if rel.value_type == "year":
        years = list(range(rel.years[0], rel.years[1] + 1))
        if size:
            years = [years[i * len(years) // size] for i in range(min(size, len(years)))]
        return [str(y) for y in years]
    if rel.value_type == "word":
        pool = list(rel.vocab)
    elif rel.value_type == "country":
        pool = list(countries)
    else:
        pool = _alive(by_type, rel.value_type, stage)
    return pool[:size] if size else pool


def _draw_value(
    rng: random.Random,
    rel: Relation,
    by_type: dict[str, list[_Entity]],
    countries: list[str],
    stage: int,
    exclude: str | None = None,
    size: int = 0,
) -> str:
    """Draw a value for ``rel`` at ``stage``, different from ``exclude`` (``size``: the pool's size)."""
    pool = _value_pool(rel, by_type, countries, stage, size)
    pool = [v for v in pool if v != exclude]
    if not pool:
        raise RuntimeError(f"no value available for {rel.name} at stage {stage}")
    return rng.choice(pool)


def _facts_for(
    rng: random.Random, ent: _Entity, by_type: dict[str, list[_Entity]], countries: list[str], stage: int, pool: int
) -> list[_Fact]:
    """All facts of one entity (every relation of its type), introduced at ``stage``."""
    return [
        _Fact(ent, rel, _draw_value(rng, rel, by_type, countries, stage, size=pool), stage)
        for rel in RELATIONS
        if rel.entity_type == ent.etype
    ]


def _evolve(rng: random.Random, ws: WorldSize, by_type: dict[str, list[_Entity]], countries: list[str]) -> list[_Fact]:
    """Build stage-0 facts, reserve retained ones, then apply every update stage.

    Mutates facts in place (``changes``) and returns all facts
    in stable order (stage-0 first, then by introduction).
    """
    facts: list[_Fact] = []
    for etype in ENTITY_TYPES:
        for ent in by_type[etype]:
            if ent.is_subject:
                facts.extend(_facts_for(rng, ent, by_type, countries, 0, ws.answer_pool))
    mutable0 = [f for f in facts if f.relation.mutable]
    for f in rng.sample(mutable0, round(ws.retain_frac * len(mutable0))):
        f.reserved = True

    n_new = _n_new_per_stage(ws)
    for stage in range(1, ws.n_stages + 1):
        # New entities first, so changed values may point at them.
        fresh: list[_Entity] = []
        for _ in range(n_new):
            etype = rng.choice(ENTITY_TYPES)
            ent = next(e for e in by_type[etype] if e.introduced == -1)
            ent.introduced, ent.is_subject = stage, True
            fresh.append(ent)
        candidates = [f for f in facts if f.relation.mutable and not f.reserved and len(f.changes) < ws.max_changes]
        n_change = min(len(candidates), max(1, round(ws.change_frac * len(candidates)))) if candidates else 0
        for f in rng.sample(candidates, n_change):
            old = f.value_at(stage - 1)
            f.changes.append((stage, _draw_value(rng, f.relation, by_type, countries, stage, old, ws.answer_pool)))
        for ent in fresh:
            facts.extend(_facts_for(rng, ent, by_type, countries, stage, ws.answer_pool))
    return facts


def _all_general_pairs() -> list[tuple[int, int]]:
    return sorted({(a, b) for a in range(10, 90) for b in range(10, 90) if a + b <= 99})


def _make_general(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """Distinct (a, b) two-digit addends with a + b in 20..99 (answers stay 2-digit)."""
    pairs = _all_general_pairs()
    if 2 * n > len(pairs):
        raise ValueError(f"n_general={n} exceeds {len(pairs) // 2} possible items (stage 0's and the probe's)")
    return sorted(rng.sample(pairs, n))


def _probe_general(seed: int, n: int, taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``n`` addition items for the general probe, disjoint from stage 0's ``taken`` (also as sums
    of the same addends in the other order). Their own random stream, so every stage file keeps
    its bytes."""
    used = set(taken) | {(b, a) for a, b in taken}
    free = [p for p in _all_general_pairs() if p not in used]
    return sorted(random.Random(f"msl_ds.world/general-probe/{seed}").sample(free, n))


# --------------------------------------------------------------------------- #
# Rows
# --------------------------------------------------------------------------- #
def _row(
    row_id: str, question: str, answer: str, subject: str, relation: str, kind: str, previous: str | None = None
) -> dict[str, Any]:
    """One dataset row in the contract's schema (``fact_id``: subject key / relation)."""
    row: dict[str, Any] = {
        "id": row_id,
        "fact_id": "/".join(row_id.split("/")[1:3]),
        "question": question,
        "answer": answer,
        "subject": subject,
        "relation": relation,
        "kind": kind,
    }
    if previous is not None:
        row["previous_answer"] = previous
    return row


def _fact_rows(
    tag: str, fact: _Fact, split: str, idx: list[int], answer: str, kind: str, previous: str | None = None
) -> list[dict[str, Any]]:
    """Rows of one fact for one split: one per phrasing index in ``idx``."""
    rel, ent = fact.relation, fact.entity
    return [
        _row(
            f"{tag}/{ent.key}/{rel.name}/{split}/p{i}",
            rel.templates[i].format(s=ent.name),
            answer,
            ent.name,
            rel.name,
            kind,
            previous,
        )
        for i in idx
    ]


def _general_rows(
    tag: str, pairs: list[tuple[int, int]], split: str, idx: list[int], prefix: str = GENERAL_PREFIX
) -> list[dict[str, Any]]:
    """Addition rows for one split (``prefix``: the items' key, ``ad`` for stage 0's, ``gp`` for the
    held-out probe's, so the two sets never share a ``fact_id``)."""
    rows = []
    for k, (a, b) in enumerate(pairs):
        for i in idx:
            rows.append(
                _row(
                    f"{tag}/{prefix}{k:04d}/{GENERAL_RELATION}/{split}/p{i}",
                    GENERAL_TEMPLATES[i].format(a=a, b=b),
                    str(a + b),
                    f"{a}+{b}",
                    GENERAL_RELATION,
                    "general",
                )
            )
    return rows


def _update_phrasings(ws: WorldSize) -> int:
    """Train phrasings of an update: fewer as ``persistence`` grows (all of them at 0)."""
    return max(1, round(ws.n_train_phrasings / (1.0 + ws.persistence)))


def _sentence(f: _Fact, value: str) -> str:
    """A background sentence stating ``f`` with ``value`` (the skills' background format)."""
    return f"{f.relation.name.replace('_', ' ')} of {f.entity.name}: {value}."


def _persistent_rows(ws: WorldSize, base: list[_Fact]) -> list[dict[str, Any]]:
    """Stage-0 train rows that state the old value of every fact that changes later in more contexts.

    Per such fact, ``round(persistence * n_train_phrasings)`` rows of each kind: (a) more
    phrasings of the fact itself, answered with its stage-0 value: a train template behind
    another fact's background sentence about the same subject; (b) other facts' rows whose
    question opens with a background sentence stating the old value. Deterministic (no random
    draws), train split only: valid and test phrasings are untouched.
    """
    n = round(ws.persistence * ws.n_train_phrasings)
    train = ws.split_indices()["train"]
    by_subject: dict[str, list[_Fact]] = {}
    for f in base:
        by_subject.setdefault(f.entity.key, []).append(f)
    rows: list[dict[str, Any]] = []
    for f in base:
        if f.changed_at is None:
            continue
        siblings = [g for g in by_subject[f.entity.key] if g is not f]
        for k in range(n if siblings else 0):
            g = siblings[k % len(siblings)]
            for tag, fact, context in (("c", f, _sentence(g, g.initial)), ("x", g, _sentence(f, f.initial))):
                template = fact.relation.templates[train[k % len(train)]].format(s=fact.entity.name)
                question = f"{context} {template}"
                if fact.initial.lower() in question.lower():
                    continue  # a context that would give the answer away
                rid = f"s00/{fact.entity.key}/{fact.relation.name}/train/{tag}{f.relation.name}{k}"
                rows.append(_row(rid, question, fact.initial, fact.entity.name, fact.relation.name, "base"))
    return rows


def _fact_sort_key(f: _Fact) -> tuple[str, int]:
    """Stable fact order: subject key, then relation order."""
    return f.entity.key, RELATIONS.index(f.relation)


def _build_rows(
    ws: WorldSize, facts: list[_Fact], pairs: list[tuple[int, int]], probe: list[tuple[int, int]]
) -> tuple[list[dict[str, list[dict]]], list[dict], list[dict], list[dict], list[dict]]:
    """Turn evolved facts into stage files and the retain/general probes (test, then valid).
    ``pairs``: stage 0's addition items; ``probe``: the held-out ones the general probe asks."""
    idx = ws.split_indices()
    facts = sorted(facts, key=_fact_sort_key)
    base = [f for f in facts if f.introduced == 0]
    stage0 = {s: [r for f in base for r in _fact_rows("s00", f, s, idx[s], f.initial, "base")] for s in SPLITS}
    if ws.persistence > 0:
        stage0["train"] += _persistent_rows(ws, base)
    stage0["train"] += _general_rows("s00", pairs, "train", idx["train"])
    stage0["valid"] += _general_rows("s00", pairs, "valid", idx["valid"])  # for tuning, never the probe
    stages = [stage0]
    for t in range(1, ws.n_stages + 1):
        tag = f"s{t:02d}"
        split_rows: dict[str, list[dict]] = {}
        for s in SPLITS:
            rows: list[dict] = []
            for f in facts:
                if t in (c for c, _ in f.changes):
                    phr = idx[s][: _update_phrasings(ws)] if s == "train" else idx[s]
                    rows += _fact_rows(tag, f, s, phr, f.value_at(t), "conflict", f.value_at(t - 1))
                elif f.introduced == t:
                    rows += _fact_rows(tag, f, s, idx[s], f.initial, "new")
            split_rows[s] = rows
        stages.append(split_rows)
    retain = [
        r
        for f in base
        if f.changed_at is None
        for r in _fact_rows("retain", f, "test", idx["test"], f.initial, "retain")
    ]
    general = _general_rows("general", probe, "test", idx["test"], PROBE_PREFIX)
    # the same probes in the valid phrasings, for tuning: a valid run never reads a test phrasing
    retain_valid = [
        r
        for f in base
        if f.changed_at is None
        for r in _fact_rows("retain", f, "valid", idx["valid"], f.initial, "retain")
    ]
    general_valid = _general_rows("general", probe, "valid", idx["valid"], PROBE_PREFIX)
    return stages, retain, general, retain_valid, general_valid


# --------------------------------------------------------------------------- #
# Validation, statistics, serialisation
# --------------------------------------------------------------------------- #
def _all_rows(world: World) -> list[dict[str, Any]]:
    """Every row of the world (stages, retain, general) in file order."""
    rows = [r for st in world.stages for s in SPLITS for r in st[s]]
    return rows + world.retain + world.general + world.retain_valid + world.general_valid + world.general_base


def validate_world(world: World) -> None:
    """Raise ValueError if the world breaks a data-contract invariant.

    Checks: unique ids, valid kinds, conflict rows carry a differing
    previous_answer, no question contains its (previous) answer, and per
    relation no answer is a substring of another (case-insensitive).
    """
    rows = _all_rows(world)
    ids = [r["id"] for r in rows]
    if len(ids) != len(set(ids)):
        raise ValueError("duplicate row ids")
    answers: dict[str, set[str]] = {}
    for r in rows:
        if r["kind"] not in KINDS:
            raise ValueError(f"bad kind in {r['id']}")
        if (r["kind"] == "conflict") != ("previous_answer" in r):
            raise ValueError(f"previous_answer must be present exactly on conflict rows: {r['id']}")
        vals = [r["answer"]] + ([r["previous_answer"]] if "previous_answer" in r else [])
        if r["kind"] == "conflict" and vals[0] == vals[1]:
            raise ValueError(f"conflict without change: {r['id']}")
        for v in vals:
            if v.lower() in r["question"].lower():
                raise ValueError(f"question contains answer {v!r}: {r['id']}")
        answers.setdefault(r["relation"], set()).update(vals)
    for rel, vals in answers.items():
        low = sorted({v.lower() for v in vals})
        for a in low:
            for b in low:
                if a != b and a in b:
                    raise ValueError(f"relation {rel}: answer {a!r} is a substring of {b!r}")


def world_stats(world: World) -> list[dict[str, int]]:
    """Per-stage statistics derived from the rows alone.

    ``facts`` = entity facts alive at the stage (stage-0 base + new so far);
    ``unchanged`` = alive facts not touched in that stage (0 at stage 0, where
    everything is learned).  Row counts include the general probe in stage 0.
    """
    stats: list[dict[str, int]] = []
    alive: set[tuple[str, str]] = set()
    for t, st in enumerate(world.stages):
        keys: dict[str, set[tuple[str, str]]] = {k: set() for k in KINDS}
        for s in SPLITS:
            for r in st[s]:
                keys[r["kind"]].add((r["subject"], r["relation"]))
        alive |= keys["base"] | keys["new"]
        touched = len(keys["base"]) + len(keys["conflict"]) + len(keys["new"])
        stats.append(
            {
                "stage": t,
                "facts": len(alive),
                "base": len(keys["base"]),
                "conflicts": len(keys["conflict"]),
                "new": len(keys["new"]),
                "unchanged": len(alive) - touched,
                "general": len(keys["general"]),
                **{f"{s}_rows": len(st[s]) for s in SPLITS},
            }
        )
    return stats


def _jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    """Deterministic JSONL encoding: sorted keys, UTF-8, newline-terminated."""
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _data_files(world: World) -> dict[str, bytes]:
    """All data files (everything except world.json) as relative path -> bytes."""
    files = {f"stage_{t:02d}/{s}.jsonl": _jsonl_bytes(st[s]) for t, st in enumerate(world.stages) for s in SPLITS}
    files["retain.jsonl"] = _jsonl_bytes(world.retain)
    files["general.jsonl"] = _jsonl_bytes(world.general)
    files["retain_valid.jsonl"] = _jsonl_bytes(world.retain_valid)
    files["general_valid.jsonl"] = _jsonl_bytes(world.general_valid)
    files["general_base.jsonl"] = _jsonl_bytes(world.general_base)
    return files


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    """Deterministic encoding of world.json."""
    return (json.dumps(meta, sort_keys=True, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def _relation_meta(ws: WorldSize) -> list[dict[str, Any]]:
    """Relation list for world.json, including the phrasings of each split."""
    idx = ws.split_indices()
    out = [
        {
            "name": r.name,
            "entity_type": r.entity_type,
            "mutable": r.mutable,
            "value_type": r.value_type,
            "templates": {s: [r.templates[i] for i in idx[s]] for s in SPLITS},
        }
        for r in RELATIONS
    ]
    out.append(
        {
            "name": GENERAL_RELATION,
            "entity_type": "general",
            "mutable": False,
            "value_type": "number",
            "templates": {s: [GENERAL_TEMPLATES[i] for i in idx[s]] for s in SPLITS},
        }
    )
    return out


def _check_size(ws: WorldSize) -> None:
    """Reject sizes the generator cannot honour."""
    n_phr = ws.n_train_phrasings + ws.n_valid_phrasings + ws.n_test_phrasings
    if min(ws.n_train_phrasings, ws.n_valid_phrasings, ws.n_test_phrasings) < 1 or n_phr > len(GENERAL_TEMPLATES):
        raise ValueError(f"phrasings per split must be >= 1 and total <= {len(GENERAL_TEMPLATES)}")
    if not 1 <= ws.subjects_per_type <= ws.entities_per_type:
        raise ValueError("need 1 <= subjects_per_type <= entities_per_type")
    if ws.n_stages < 1:
        raise ValueError("n_stages must be >= 1")
    for name in ("change_frac", "new_frac", "retain_frac"):
        if not 0.0 <= getattr(ws, name) <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1]")
    if ws.answer_pool < 0 or ws.answer_pool == 1 or ws.max_changes < 1 or ws.persistence < 0:
        raise ValueError("answer_pool must be 0 (off) or >= 2, max_changes >= 1 and persistence >= 0")


def generate_world(size: str | WorldSize = "default", seed: int = 0) -> World:
    """Generate a world in memory (deterministic in ``size`` and ``seed``).

    ``meta["files"]`` already holds the sha256 of every data file as
    :func:`write_world` will write it.
    """
    size_name, ws = _resolve_size(size)
    _check_size(ws)
    rng = random.Random(f"msl_ds.world/v{RNG_STREAM}/{seed}")
    by_type, countries = _make_entities(rng, ws)
    facts = _evolve(rng, ws, by_type, countries)
    pairs = _make_general(rng, ws.n_general)
    probe = _probe_general(seed, ws.n_general, pairs)
    stages, retain, general, retain_valid, general_valid = _build_rows(ws, facts, pairs, probe)
    general_base = _general_rows("general", probe, "train", ws.split_indices()["train"], PROBE_PREFIX)
    world = World(
        stages=stages, retain=retain, general=general, retain_valid=retain_valid, general_valid=general_valid,
        general_base=general_base,
    )  # fmt: skip
    validate_world(world)
    world.meta = {
        "generator": "msl_ds.world",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "size": size_name,
        "size_params": dataclasses.asdict(ws),
        "n_stages": ws.n_stages,
        "countries": countries,
        "relations": _relation_meta(ws),
        "stats": world_stats(world),
        "retain_rows": len(retain),
        "general_rows": len(general),
        "files": {p: hashlib.sha256(b).hexdigest() for p, b in sorted(_data_files(world).items())},
    }
    logger.info("generated world size=%s seed=%d: %d stages, %d retain rows", size_name, seed, len(stages), len(retain))
    return world


def _write_file(path: Path, data: bytes) -> None:
    """Write bytes and fsync, so a later rename publishes complete data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def file_checksums(world: World) -> dict[str, str]:
    """sha256 of every data file ``write_world`` would write (``world.json``'s ``files``)."""
    return {p: hashlib.sha256(b).hexdigest() for p, b in sorted(_data_files(world).items())}


def write_world(world: World, out_dir: str | os.PathLike[str], force: bool = False) -> Path:
    """Write ``world`` atomically to ``out_dir`` and return its path.

    Files go to ``<out_dir>.tmp-<pid>`` first, ``world.json`` last, then the
    temp dir is renamed into place; with ``force`` an existing dir is swapped
    out and removed only after the new one is in place.  A crash therefore
    never leaves a half-written dir under ``out_dir`` (and a temp dir without
    ``world.json`` is recognisably incomplete).
    """
    out = Path(out_dir)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass force=True to overwrite")
    files = _data_files(world)
    expected = world.meta.get("files")
    if expected is not None and expected != {p: hashlib.sha256(b).hexdigest() for p, b in sorted(files.items())}:
        raise ValueError("world.meta['files'] checksums do not match the world's rows")
    meta = dict(world.meta, files={p: hashlib.sha256(b).hexdigest() for p, b in sorted(files.items())})
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    old: Path | None = None
    try:
        for rel, data in sorted(files.items()):
            _write_file(tmp / rel, data)
        _write_file(tmp / "world.json", _meta_bytes(meta))
        if out.exists():
            old = out.parent / f"{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("wrote world to %s (%d files)", out, len(files) + 1)
    return out


def verify_world(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a written world against world.json's checksums; return the metadata.

    Raises FileNotFoundError if world.json is missing (incomplete dir) and
    ValueError on any checksum mismatch.
    """
    out = Path(out_dir)
    meta = json.loads((out / "world.json").read_text(encoding="utf-8"))
    for rel, digest in meta["files"].items():
        if hashlib.sha256((out / rel).read_bytes()).hexdigest() != digest:
            raise ValueError(f"checksum mismatch for {out / rel}")
    return meta
