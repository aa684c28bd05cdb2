"""Tokenizers and causal LMs: loading from a local path (ZeRO-3 aware) and building tiny ones.

Any Hugging Face causal LM directory works. ``build_tokenizer`` trains a SentencePiece model on a
corpus and wraps it as a Hugging Face tokenizer with a chat template; ``init_model_dir`` writes a
randomly initialised model from an architecture config. Both exist because no pretrained weights
can be downloaded on the machines this project targets.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from msl_ds import distributed as D
from msl_ds.chat import (
    NAMED_TEMPLATES,
    TOY_CHAT_TEMPLATE,
    TemplateError,
    check_template,
    prompt_ids,  # noqa: F401  (re-exported for callers that ask the model's module)
)

log = logging.getLogger(__name__)

# the template of the tokenizers msl_ds trains itself (model.chat_template: toy)
DEFAULT_CHAT_TEMPLATE = TOY_CHAT_TEMPLATE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelError(RuntimeError):
    pass


def load_tokenizer(path: str | Path, chat_template: str | None = None, trust_remote_code: bool = False):
    """The tokenizer at ``path`` with a chat template msl_ds can train and generate with.

    ``chat_template`` (``model.chat_template``) replaces the tokenizer's own: a name from
    :data:`msl_ds.chat.NAMED_TEMPLATES`, a file holding a Jinja template, or the template itself.
    A tokenizer left without a template is refused: rows rendered in a format the model was not
    trained on would be silently wrong.
    """
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.exists():
        raise ModelError(f"model.path: {p} does not exist (expected a Hugging Face model directory)")
    if not p.is_dir():
        raise ModelError(f"model.path: {p} is not a directory (expected a Hugging Face model directory)")
    tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    if chat_template:
        t = Path(chat_template)
        if chat_template in NAMED_TEMPLATES:
            tok.chat_template = NAMED_TEMPLATES[chat_template]
        else:
            tok.chat_template = t.read_text(encoding="utf-8") if t.is_file() else chat_template
    if not getattr(tok, "chat_template", None):
        raise ModelError(
            f"model.path: the tokenizer in {p} has no chat template; msl_ds renders every row with the model's "
            f"own template. Set model.chat_template to a Jinja template (a string or a file) or to a named one "
            f"({', '.join(sorted(NAMED_TEMPLATES))})"
        )
    if tok.eos_token_id is None:
        raise ModelError(f"{p}: tokenizer has no eos token; answers could never end")
    try:
        check_template(tok)
    except TemplateError as exc:
        where = "model.chat_template" if chat_template else f"the chat template of {p}"
        raise ModelError(f"{where}: {exc} (set model.chat_template to a template that fits this model)") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# where architectures keep their longest position (the first one present counts)
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def check_model_dir(path: str | Path, max_seq_len: int | None = None) -> None:
    """Refuse a model directory cheaply (no torch, no transformers) before anything is written.

    It must exist and hold ``config.json``; with ``max_seq_len``, the architecture's position
    limit must cover ``data.max_seq_len`` (positions past it are garbage or an index error).
    """
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model.path: {p} does not exist (expected a Hugging Face model directory)")
    config = p / "config.json"
    if not config.is_file():
        raise ModelError(f"model.path: {p} has no config.json (expected a Hugging Face model directory)")
    if max_seq_len is None:
        return
    import json

    text = config.read_text(encoding="utf-8")
    arch = json.loads(text)
    arch = arch.get("text_config", arch) if isinstance(arch.get("text_config"), dict) else arch
    for key in POSITION_KEYS:
        limit = arch.get(key)
        if isinstance(limit, int) and limit > 0:
            if max_seq_len > limit:
                line = next((i for i, s in enumerate(text.splitlines(), 1) if f'"{key}"' in s), 1)
                raise ModelError(
                    f"{config}:{line}: {key} is {limit}, shorter than data.max_seq_len={max_seq_len}; "
                    f"lower data.max_seq_len (with data.overlong=truncate if rows are longer) or use a model "
                    f"with more positions"
                )
            return


def load_model(
    path: str | Path,
    ds_config: dict[str, Any],
    dtype: str = "fp32",
    trust_remote_code: bool = False,
    max_seq_len: int | None = None,
    attn_implementation: str | None = None,
):
    """Load a causal LM, partitioned as it loads when ZeRO-3 is on (``max_seq_len``: see
    :func:`check_model_dir`).

    ``attn_implementation``: ``sdpa`` | ``eager`` | ``flash_attention_2`` (``None``: transformers'
    default). Returns ``(model, pad_token_id)``. transformers' ``_init_weights`` zeroes
    ``weight[padding_idx]`` of embeddings, which fails on an empty ZeRO-3 partition (IndexError,
    seen with transformers 5.24), so the model is built with ``pad_token_id=None`` and the pad id
    is handed back to the caller for generation and restored on export.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(path)
    check_model_dir(p, max_seq_len)
    config = AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    pad = config.pad_token_id
    config.pad_token_id = None
    keep_alive = D.hf_deepspeed_config(ds_config) if _zero3(ds_config) else None  # noqa: F841
    with D.reuse_hpz_group() if _zero3(ds_config) else contextlib.nullcontext():  # one engine per stage
        model = AutoModelForCausalLM.from_pretrained(
            str(p),
            config=config,
            dtype=DTYPES[dtype],
            trust_remote_code=trust_remote_code,
            **({"attn_implementation": attn_implementation} if attn_implementation else {}),
        )
    del keep_alive
    model.config.use_cache = True
    return model, pad


def _zero3(ds_config: dict[str, Any]) -> bool:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3


def export_model(model, tokenizer, pad_token_id: int | None, out_dir: str | Path) -> None:
    """Write an HF safetensors export of ``model`` to ``out_dir`` atomically (call on all ranks).

    Every rank takes part in gathering; rank 0 (on node-local disks: each node's local rank 0,
    :func:`msl_ds.distributed.is_writer`) writes into a temporary sibling directory and renames it
    into place, so a crash never leaves a half-written export under the final name.
    """
    out = Path(out_dir)
    state = D.full_state_dict(model)
    if D.is_writer():
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a run killed mid-export
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        config = copy.deepcopy(model.config)
        config.pad_token_id = pad_token_id
        if not D.is_rank0():  # transformers 5 writes weights on global rank 0 only (should_save_on_this_rank)
            model.should_save_on_this_rank = lambda is_main_process: is_main_process
        try:
            model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        finally:
            model.__dict__.pop("should_save_on_this_rank", None)
        config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        from msl_ds.fault import maybe_fault
        from msl_ds.io import replace_dir

        maybe_fault("export")  # written in full under the temporary name, not yet renamed into place
        replace_dir(tmp, out)
    D.barrier()


# --------------------------------------------------------------------------- building tiny models


def build_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int, seed: int = 0):
    """Train a SentencePiece BPE tokenizer on ``texts`` and save it as an HF Llama tokenizer."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # byte fallback needs the 256 byte pieces besides every character of the corpus
    floor = 256 + len(set("".join(texts))) + 8
    if vocab_size < floor:
        log.warning("vocab_size %d raised to %d (256 byte pieces + the corpus' characters)", vocab_size, floor)
        vocab_size = floor
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(Path(tmp) / "sp"),
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            byte_fallback=True,  # any unseen character still round-trips
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            split_digits=True,
            hard_vocab_limit=False,
            num_threads=1,
            minloglevel=2,
        )
        (out / "tokenizer.model").write_bytes((Path(tmp) / "sp.model").read_bytes())
    # LlamaTokenizer(vocab_file=...) encodes to empty lists in transformers 5.24, while
    # from_pretrained on a directory holding tokenizer.model works (LlamaTokenizer(vocab_file=...) gave empty ids in transformers 5.24).
    tok = LlamaTokenizer.from_pretrained(str(out), legacy=False, add_prefix_space=False)
    tok.pad_token = "<pad>"
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    return tok


def init_model_dir(arch: dict[str, Any], tokenizer, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised causal LM built from ``arch`` (``model_type`` + sizes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(arch)
    model_type = arch.pop("model_type", "llama")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **arch,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
