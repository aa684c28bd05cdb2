"""SentencePiece tokenizer built here: round trip, chat template, answer-only labels; templates refused."""

from __future__ import annotations

import pytest

from msl_ds.chat import answer_ids, end_of_turn_id
from msl_ds.data import encode_example
from msl_ds.modeling import ModelError, build_tokenizer, load_tokenizer, prompt_ids

TEXTS = [
    "Who is the chief executive of Zorvex?",
    "Kalin Marr",
    "In which city is Zorvex headquartered?",
    "Tarvo",
    "What is 14 plus 41?",
    "55",
] * 30


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(TEXTS, d, vocab_size=200)
    return load_tokenizer(d)


@pytest.mark.parametrize(
    "text",
    ["Who is the chief executive of Zorvex?", "Kalin Marr, 1987.", "Unseen wörds & ünïcode: ∑ 42!", "  spaced   out  "],
)
def test_tokenizer_round_trips(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert ids, "empty encoding (the LlamaTokenizer(vocab_file=...) bug)"
    assert tok.decode(ids) == text.strip() or tok.decode(ids) == text


def test_prompt_and_answer_ids(tok):
    p = prompt_ids(tok, "Who leads Zorvex?")
    assert p[0] == tok.bos_token_id
    assert tok.decode(p, skip_special_tokens=True).strip() == "Question: Who leads Zorvex? Answer:"
    assert end_of_turn_id(tok) == tok.eos_token_id  # the toy template closes a turn with eos
    assert tok.decode(answer_ids(tok, "Kalin Marr"), skip_special_tokens=True).strip() == "Kalin Marr"


def test_labels_cover_answer_only(tok):
    row = {"id": "x", "question": "Who leads Zorvex?", "answer": "Kalin Marr"}
    ex = encode_example(tok, row, 64, "error", "f")
    n_prompt = len(prompt_ids(tok, row["question"]))
    assert ex.input_ids[:n_prompt] == prompt_ids(tok, row["question"])
    assert ex.labels[:n_prompt] == [-100] * n_prompt
    assert ex.labels[n_prompt:] == [*answer_ids(tok, "Kalin Marr"), tok.eos_token_id]


TURNS = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}Q {{ m['content'] }} A{% else %} "


def test_chat_template_override(tmp_path, tok):
    d = tmp_path / "t"
    tok.save_pretrained(str(d))
    t = load_tokenizer(d, chat_template=TURNS + "{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    assert t.decode(prompt_ids(t, "hi"), skip_special_tokens=True).strip() == "Q hi A"
    with pytest.raises(ModelError, match="model.chat_template: .* holds no special token"):
        load_tokenizer(d, chat_template=TURNS + "{{ m['content'] }}.{% endif %}{% endfor %}")


def test_tokenizer_without_template_refused_unless_named(tmp_path, tok):
    d = tmp_path / "bare"
    tok.save_pretrained(str(d))
    for f in d.glob("chat_template*"):
        f.unlink()
    cfg = d / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace('"chat_template"', '"unused_template"'))
    with pytest.raises(ModelError, match=r"has no chat template.*model\.chat_template"):
        load_tokenizer(d)
    assert load_tokenizer(d, chat_template="toy").chat_template == tok.chat_template
