"""Asking a checkpoint questions the way a run does, for world builders that keep only what it knows."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

from msl_ds.generation import GenConfig, generate
from msl_ds.io import sha256, write_json

log = logging.getLogger("msl_ds")
Ask = Callable[[list[str]], list[str]]  # questions -> the model's greedy answers


def model_asker(model_dir: str | Path, max_new_tokens: int = 24, batch_size: int = 32) -> Ask:
    """A function from questions to the checkpoint's greedy answers.

    The model and tokenizer are loaded with ``transformers`` from ``model_dir`` (a plain HF
    directory, e.g. written by ``msl-import-model``); prompts are rendered by the tokenizer's chat
    template and answers end at the checkpoint's end tokens, exactly as evaluation renders them
    (:func:`msl_ds.generation.generate`, single process).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from msl_ds.chat import check_template

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    check_template(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg = GenConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, cap_key="--max-new-tokens")

    def ask(questions: list[str]) -> list[str]:
        if not questions:
            return []
        return [o["text"] for o in generate(model, tokenizer, pad, questions, cfg, desc="known-world questions")]

    return ask


def model_key(model_dir: str | Path, max_new_tokens: int) -> str:
    """What a checkpoint's greedy answers depend on: the bytes of every file of its directory
    (weights, config, tokenizer, chat template, generation config) and the length cap."""
    files = {p.name: sha256(p) for p in sorted(Path(model_dir).iterdir())
             if p.is_file() and p.name != "import.json"}  # import.json records paths and times, not the model  # fmt: skip
    return hashlib.sha256(json.dumps([max_new_tokens, files], sort_keys=True).encode()).hexdigest()


def cached_asker(ask: Ask, path: str | Path, key: str) -> Ask:
    """``ask`` whose answers persist in ``path`` (JSON: ``key`` and ``{question: answer}``), written
    atomically after every call: a build that stops (too few known facts for the sizes asked, a
    kill) asks nothing twice when run again. A file made for another key (another checkpoint or
    length cap) is not reused: it is started anew."""
    path = Path(path)
    answers: dict[str, str] = {}
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("key") == key:
            answers = data["answers"]
            log.info("%s: %d answers of this checkpoint reused", path, len(answers))
        else:
            log.info("%s: answers of another checkpoint or length cap, not reused", path)

    def asked(questions: list[str]) -> list[str]:
        todo = list(dict.fromkeys(q for q in questions if q not in answers))
        if todo:
            answers.update(zip(todo, ask(todo)))
            write_json(path, {"key": key, "answers": answers})
        return [answers[q] for q in questions]

    return asked
