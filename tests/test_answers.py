"""The answer extractor and whole-word matching (msl_ds.answers), and what augmentation does with
stale values: replaced, and a row that still states one rejected."""

import pytest

from msl_ds.answers import extract_value, normalize, states
from msl_ds.augment import acceptance, select, stale_oracle, stale_values
from msl_ds.config import SelectSection
from msl_ds.evaluation import is_correct


def test_short_gold_is_not_found_inside_a_longer_number():
    assert not states("10", "1")
    assert not states("The answer is 10.", "1")
    assert states("The answer is 1.", "1")
    assert not states("1957", "57")
    assert not is_correct("10", "1")
    assert is_correct("10", "1", rule="substring")  # the authors' rule, kept by eval.match: substring


def test_punctuation_case_and_accents_are_ignored():
    assert states("The capital of France is PARIS.", "Paris")
    assert states("paris!", "Paris")
    assert states("It is Zürich, of course", "Zurich")
    assert states("The CEO is Kalin Marr.", "kalin marr")
    assert not states("Kalin", "Kalin Marr")
    assert not states("Romeo", "Rome")
    assert not states("anything", "")


def test_numbers_with_thousands_separators():
    assert normalize("1,000,000 km.") == "1000000 km"
    assert states("About 1,000 people live there.", "1000")
    assert states("1000", "1,000")
    assert not states("1,0001", "1000")
    assert states("1, 2 and 3", "1")  # a list, not a thousands separator


def test_extract_value_strips_the_restated_question():
    q = "What is the capital of France? Answer in a few words."
    assert extract_value("The capital of France is Paris.", q) == "Paris"
    assert extract_value("Paris.", q) == "Paris"
    assert extract_value("Paris is the capital of France.", q) == "Paris"
    assert extract_value("The capital of France is Paris. It is big.", q) == "Paris"
    assert (
        extract_value("The capital of France is the city of Lyon (since 2024).", q) == "city of Lyon"
    )  # only the ends are stripped
    assert extract_value("The capital of France.", q) == ""
    assert extract_value("Ethiopia's capital city is Addis Ababa.", "What is the capital of Ethiopia?") == "Addis Ababa"
    q2 = "What is the currency of Japan?"
    assert extract_value("The currency of Japan is the Japanese Yen (JPY).", q2) == "Japanese Yen"


def test_stale_values_are_the_answer_and_the_value_it_states():
    q = "What is the capital of France?"
    assert stale_values("The capital of France is Paris.", q, "Lyon") == ["The capital of France is Paris.", "Paris"]
    assert stale_values("The capital of France is Lyon.", q, "Lyon") == []  # already the gold
    assert stale_values("", q, "Lyon") == []


def _rec(kind, question, answer, stale, **extra):
    return {
        "kind": kind, "source_id": "s1/France/capital/train/p0", "subject": "France", "prompt": "p", "raw": question,
        "finished": True, "question": question, "answer": answer, "x": "What is the capital of France?",
        "y_hat": answer, "own": answer, "stale": stale, **extra,
    }  # fmt: skip


def test_a_row_stating_a_stale_value_is_rejected_whatever_its_wording():
    stale = [["The capital of France is Paris.", "Lyon"], ["Paris", "Lyon"]]
    records = [
        _rec("paraphrase", "Which city is the French capital, France's Paris?", "Lyon", stale),
        _rec("paraphrase", "Which city is the seat of government of France?", "Lyon", stale),
        _rec(
            "background",
            "France, with PARIS. as its heart, is in Europe. What is the capital of France?",
            "Lyon",
            stale,
        ),
        _rec("rehearsal", "Tell me about France.", "France is a country; its capital, Paris, is old.", stale),
    ]
    select(records, SelectSection(enabled=False))
    assert [r["reason"] for r in records] == ["stale", "ok", "stale", "stale"]
    oracle = stale_oracle(
        [{"subject": "France", "relation": "capital", "question": "q", "answer": "Lyon", "previous_answer": "Paris"}]
    )
    assert oracle == {"France": {"Paris"}}
    m = acceptance(records, oracle)
    assert m["aug_stale_accepted"] == 0 and m["aug_paraphrase_accepted"] == 1
    leaked = _rec("paraphrase", "Is Paris the capital of France?", "Lyon", [], accepted=True)
    assert acceptance([leaked], oracle)["aug_stale_accepted"] == 1  # counted when a leak gets through


def test_a_rewrite_that_answers_instead_of_asking_is_rejected():
    records = [_rec("paraphrase", "The capital of France is Lyon.", "Lyon", [])]
    select(records, SelectSection(enabled=False))
    assert records[0]["reason"] == "states_answer"


@pytest.mark.parametrize("rule", ["word", "substring"])
def test_is_correct_rules(rule):
    assert is_correct("The capital is Paris.", "paris", rule)
    assert not is_correct("The capital is Lyon.", "paris", rule)


def test_probe_compares_an_instruct_models_samples_by_the_value_they_state():
    from msl_ds.probe import label_fact

    q = "What is the capital of France? Answer in a few words."
    greedy = "The capital of France is Paris."
    samples = ["Paris.", "Paris is the capital of France.", "It is Paris", "The capital of France is Marseille."]
    assert label_fact("Lyon", greedy, samples, 0.5, None, False, q) == ("conflict", 0.75)
    assert label_fact("Lyon", greedy, samples, 0.5, None, False)[0] == "unknown"  # by wording: no agreement
    assert label_fact("Paris", greedy, samples, 0.5, None, False, q)[0] == "known"


def test_fact_scope_votes_over_every_phrasing_of_a_fact():
    """``pbl.consistency_scope: fact``: an instruct model's samples of one phrasing scatter while
    its greedy answers to the fact's phrasings agree (SmolLM2-135M on Argentina's capital, as its
    probe recorded them); the fact-level vote calls each phrasing a conflict, the per-question
    vote only the first. Another fact's answers never count."""
    from msl_ds.probe import consistency_evidence, label_fact

    qs = ["What is the capital of Argentina? Answer in a few words.",
          "Which city is the capital of Argentina? Answer in a few words.",
          "Name the capital city of Argentina. Answer in a few words."]  # fmt: skip
    rows = [{"fact_id": "Argentina/capital", "question": q} for q in qs] + [
        {"fact_id": "Peru/capital", "question": "?"}
    ]
    greedy = ["Argentina's capital is Buenos Aires.", "Argentina's capital is Buenos Aires.",
              "Argentina's capital city is Buenos Aires.", "Lima."]  # fmt: skip
    samples = [
        ["The capital of Argentina is Buenos Aires.", "Buenos Aires.", "In Argentina, the capital is Buenos Aires.",
         "Argentina's capital is Buenos Aires."],
        ["Argentina is the capital of the South American nation of Argentina.", "Almergota is the capital of Argentina.",
         "Almería, also known as the capital of Argentina, is a city", "Argentina's capital: Buenos Aires"],
        ["Argentina's capital city is La Plata.", "Argentina's capital city is Belo Horizonte.",
         "Argentina's capital city isn't officially defined", "Argentina's capital city is Buenos Aires."],
        ["Lima.", "Lima.", "Lima.", "Lima."],
    ]  # fmt: skip
    own = consistency_evidence(rows, greedy, samples, "question")
    pooled = consistency_evidence(rows, greedy, samples, "fact")
    assert own == samples
    assert len(pooled[0]) == 12 + 2 and "Lima." not in pooled[1] and pooled[3] == samples[3]
    per_question = [label_fact("Rosario", g, ev, 0.5, None, False, q)[0] for g, ev, q in zip(greedy, own, qs)]
    per_fact = [label_fact("Rosario", g, ev, 0.5, None, False, q)[0] for g, ev, q in zip(greedy, pooled, qs)]
    assert per_question == ["conflict", "unknown", "unknown"]
    assert per_fact == ["conflict", "conflict", "conflict"]
