"""How a model's own chat template renders msl_ds rows, and which tokens end a turn.

A training row is the conversation ``[user: question, assistant: answer]`` rendered by
``tokenizer.apply_chat_template(..., tokenize=True)``, token for token; the loss covers the
assistant's tokens from the end of the generation prompt up to and including the template's
end-of-turn token (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``, or eos for templates that end
a turn with it). Whatever the template renders after that token (ChatML's ``\\n``) stays in the
row without loss. Generation prompts are the same user turn with ``add_generation_prompt=True``.

The toy template of the embedded world is available by name (``model.chat_template: toy``);
a tokenizer without a template is refused (:func:`msl_ds.modeling.load_tokenizer`).
"""

from __future__ import annotations

import weakref
from typing import Any

# The template of the tokenizers msl_ds trains itself (the embedded world). It is plain text on
# purpose: a tiny model learns it in a few hundred steps.
TOY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }} "
    "{% elif m['role'] == 'user' %}Question: {{ m['content'] }} Answer:"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
NAMED_TEMPLATES = {"toy": TOY_CHAT_TEMPLATE}  # model.chat_template may name one of these

_PROBE_QUESTION = "msl question"
_PROBE_ANSWER = "msl answer"


class TemplateError(ValueError):
    """A chat template msl_ds cannot train with; the message says why."""


def messages(question: str, answer: str | None = None) -> list[dict[str, str]]:
    conv = [{"role": "user", "content": question}]
    if answer is not None:
        conv.append({"role": "assistant", "content": answer})
    return conv


def render(tokenizer, conv: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    """``apply_chat_template(conv, tokenize=True)`` as a plain list of ids."""
    ids: Any = tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def prompt_ids(tokenizer, question: str) -> list[int]:
    """Token ids of a user turn followed by the assistant generation prompt."""
    return render(tokenizer, messages(question), add_generation_prompt=True)


_END_OF_TURN: "weakref.WeakKeyDictionary[Any, dict[str, int]]" = weakref.WeakKeyDictionary()


def end_of_turn_id(tokenizer) -> int:
    """The special token the chat template closes an assistant turn with.

    Found by rendering a probe conversation as text: the first special token after the
    assistant's content (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``, eos, ...).
    """
    template = tokenizer.chat_template or ""
    cached = _END_OF_TURN.setdefault(tokenizer, {})
    if template not in cached:
        text = tokenizer.apply_chat_template(messages(_PROBE_QUESTION, _PROBE_ANSWER), tokenize=False)
        if _PROBE_ANSWER not in text:
            raise TemplateError("the chat template does not render the assistant's message")
        tail = text[text.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER) :]
        special = set(tokenizer.all_special_ids) | {
            i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)
        }
        ids = tokenizer.encode(tail, add_special_tokens=False)
        found = next((i for i in ids if i in special), None)
        if found is None:
            raise TemplateError(
                f"the chat template ends an assistant turn with {tail!r}, which holds no special token: "
                "generation could not tell where an answer ends"
            )
        cached[template] = found
    return cached[template]


def check_template(tokenizer) -> None:
    """Refuse a template msl_ds cannot split into prompt and answer (raises TemplateError)."""
    end_of_turn_id(tokenizer)
    encode_turn(tokenizer, _PROBE_QUESTION, _PROBE_ANSWER)


def encode_turn(tokenizer, question: str, answer: str) -> tuple[list[int], int, int]:
    """``(ids, start, stop)``: the rendered conversation and its answer span ``ids[start:stop]``.

    ``ids`` is ``apply_chat_template([user, assistant], tokenize=True)``; the span runs from the
    end of the generation prompt through the template's end-of-turn token. Where a tokenizer
    merges across the prompt's end, the span starts at the first token that differs.
    """
    prompt = prompt_ids(tokenizer, question)
    ids = render(tokenizer, messages(question, answer), add_generation_prompt=False)
    start = 0
    for a, b in zip(prompt, ids):
        if a != b:
            break
        start += 1
    eot = end_of_turn_id(tokenizer)
    try:
        stop = ids.index(eot, start + 1) + 1  # the answer has at least one token before its end
    except ValueError:
        raise TemplateError(
            f"the chat template rendered no end-of-turn token ({tokenizer.convert_ids_to_tokens(eot)!r}) after "
            f"the answer {answer!r}"
        ) from None
    return ids, start, stop


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The tokens of ``answer`` as the template renders an assistant turn, without its end token."""
    ids, start, stop = encode_turn(tokenizer, _PROBE_QUESTION, answer)
    return ids[start : stop - 1]
