"""Asking a checkpoint questions the way a run does, for world builders that keep only what it knows."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from msl_ds.generation import GenConfig, generate


def model_asker(
    model_dir: str | Path, max_new_tokens: int = 24, batch_size: int = 32
) -> Callable[[list[str]], list[str]]:
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
