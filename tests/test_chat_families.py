"""Real-checkpoint formats on CPU: Llama-3, Qwen2/ChatML and Gemma stand-ins (tests/chat_families.py).

What msl_ds trains on is the model's own chat template, token for token; the loss covers the
assistant's turn and its end-of-turn token, nothing else; generation stops on every end token.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from chat_families import FAMILIES, build_model_dir

from msl_ds.chat import answer_ids, end_of_turn_id
from msl_ds.data import encode_example
from msl_ds.generation import GenConfig, _decode, hf_generation_config, stop_ids
from msl_ds.modeling import load_tokenizer

ROWS = [
    {"id": "0", "question": "Who leads company A?", "answer": "Person AA"},
    {"id": "1", "question": "  Where is Zorvex based?", "answer": "Tarvo, 1987."},
    {"id": "2", "question": "Unseen wörds & ünïcode: ∑ 42!", "answer": "Kalin Marr"},
]
TEXTS = [r["question"] for r in ROWS] + [r["answer"] for r in ROWS]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    d = build_model_dir(request.param, TEXTS * 20, tmp_path_factory.mktemp(request.param))
    return request.param, d, load_tokenizer(d)


def chat_ids(tok, conv, **kw) -> list[int]:
    ids = tok.apply_chat_template(conv, tokenize=True, **kw)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_trained_ids_are_the_template_and_loss_is_the_assistant_turn(family):
    name, _, tok = family
    eot = tok.convert_tokens_to_ids(FAMILIES[name]["end_of_turn"])
    assert end_of_turn_id(tok) == eot
    for row in ROWS:
        conv = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
        ex = encode_example(tok, row, 512, "error", "rows")
        assert ex.input_ids == chat_ids(tok, conv), name
        prompt = chat_ids(tok, conv[:1], add_generation_prompt=True)
        assert ex.input_ids[: len(prompt)] == prompt
        scored = [i for i, x in enumerate(ex.labels) if x != -100]
        # one contiguous span: right after the generation prompt, through the end-of-turn token
        assert scored == list(range(len(prompt), scored[-1] + 1)), name
        assert [ex.labels[i] for i in scored] == ex.input_ids[len(prompt) : scored[-1] + 1]
        assert ex.input_ids[scored[-1]] == eot and eot not in ex.input_ids[len(prompt) : scored[-1]]
        assert tok.decode(ex.input_ids[len(prompt) : scored[-1]]) == row["answer"].strip(), name
        assert answer_ids(tok, row["answer"]) == ex.input_ids[len(prompt) : scored[-1]]


def test_generation_stops_on_every_end_token(family):
    from transformers import GenerationConfig

    name, d, tok = family
    model = SimpleNamespace(generation_config=GenerationConfig.from_pretrained(str(d)))
    stops = stop_ids(model, tok)
    expected = {
        tok.convert_tokens_to_ids(t) for t in [*FAMILIES[name]["generation_eos"], FAMILIES[name]["end_of_turn"]]
    }
    assert set(stops) == expected | {tok.eos_token_id}, name
    answer = answer_ids(tok, "Person AA")
    for stop in stops:
        out = _decode(tok, [*answer, stop, *answer], set(stops), tok.pad_token_id)
        assert out == {"text": "Person AA", "finished": True, "ids": [*answer, stop]}
    assert _decode(tok, answer, set(stops), tok.pad_token_id)["finished"] is False


def test_generation_config_is_explicit():
    """Nothing from the library's defaults (top_k 50) or a checkpoint's sampling settings."""
    sampled = hf_generation_config(GenConfig(do_sample=True, temperature=1.0, top_p=1.0), [7, 9], 0)
    assert sampled.top_k == 0 and sampled.temperature == 1.0 and sampled.repetition_penalty == 1.0
    assert sampled.eos_token_id == [7, 9] and sampled.max_new_tokens == 16
    assert hf_generation_config(GenConfig(do_sample=True, top_k=5), [7], 0).top_k == 5
    assert hf_generation_config(GenConfig(), [7], 0).do_sample is False
