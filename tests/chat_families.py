"""Tiny stand-ins for real checkpoints, built locally (no hub): their tokenizers and chat templates.

* ``llama3``: byte-level BPE with Llama-3's pre-tokenizer regex, ``<|begin_of_text|>``, turns
  closed by ``<|eot_id|>``, tokenizer eos ``<|end_of_text|>`` (as first released) and a
  ``generation_config.eos_token_id`` list of both; Llama-3-Instruct's template; llama3 RoPE scaling.
* ``qwen2``: byte-level BPE (Qwen2's regex), ChatML ``<|im_start|>``/``<|im_end|>`` with the
  default system turn, no bos, tokenizer eos ``<|endoftext|>``; Qwen2-Instruct's template.
* ``gemma``: SentencePiece-style BPE (``▁`` for spaces), ``<start_of_turn>``/``<end_of_turn>``, eos
  ``<eos>`` alone in ``generation_config`` (the end-of-turn token must come from the template).
"""

from __future__ import annotations

import json
from pathlib import Path

LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
FAMILIES = {
    "llama3": {
        "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "bos": "<|begin_of_text|>",
        "eos": "<|end_of_text|>",
        "pad": None,
        "end_of_turn": "<|eot_id|>",
        "generation_eos": ["<|end_of_text|>", "<|eot_id|>"],
        "template": LLAMA3_TEMPLATE,
        "arch": {
            "model_type": "llama",
            **SMALL,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
            "tie_word_embeddings": False,
        },
    },
    "qwen2": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|endoftext|>",
        "pad": "<|endoftext|>",
        "end_of_turn": "<|im_end|>",
        "generation_eos": ["<|endoftext|>"],
        "template": QWEN2_TEMPLATE,
        "arch": {"model_type": "qwen2", **SMALL, "num_key_value_heads": 2, "max_position_embeddings": 512},
    },
    "gemma": {
        "specials": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        "bos": "<bos>",
        "eos": "<eos>",
        "pad": "<pad>",
        "end_of_turn": "<end_of_turn>",
        "generation_eos": ["<eos>"],
        "template": GEMMA_TEMPLATE,
        "arch": {
            "model_type": "gemma",
            **SMALL,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 512,
        },
    },
}


def _backend(name: str, texts: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    spec = FAMILIES[name]
    if name == "gemma":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.Split("▁", behavior="merged_with_next")]
        )
        tok.decoder = decoders.Replace("▁", " ")
        alphabet = sorted(set("".join(texts).replace(" ", "▁")) | {"\n"})
    else:
        regex = LLAMA3_REGEX if name == "llama3" else QWEN2_REGEX
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=spec["specials"], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def build_tokenizer(name: str, texts: list[str], out_dir: str | Path, vocab_size: int = 400):
    """The family's tokenizer trained on ``texts``, saved (tokenizer.json + template) to ``out_dir``."""
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[name]
    texts = [*texts, "system user assistant model You are a helpful assistant."]  # the templates' own words
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_backend(name, texts, vocab_size),
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token=spec["pad"],
        unk_token="<unk>" if name == "gemma" else None,
        additional_special_tokens=[t for t in spec["specials"] if t not in (spec["bos"], spec["eos"], spec["pad"])],
    )
    tok.chat_template = spec["template"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return tok


def build_model_dir(
    name: str, texts: list[str], out_dir: str | Path, seed: int = 0, vocab_size: int = 400, **arch
) -> Path:
    """Tokenizer + randomly initialised tiny model of the family (``arch`` overrides its sizes),
    with its ``generation_config``."""
    from msl_ds.modeling import init_model_dir

    spec = FAMILIES[name]
    out = Path(out_dir)
    tok = build_tokenizer(name, texts, out, vocab_size)
    init_model_dir({**spec["arch"], **arch}, tok, out, seed=seed)
    eos = [tok.convert_tokens_to_ids(t) for t in spec["generation_eos"]]
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": eos if len(eos) > 1 else eos[0]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out
