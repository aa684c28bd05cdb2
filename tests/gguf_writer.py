"""A tiny random Llama and its ChatML tokenizer, written to a GGUF file with the ``gguf`` package's
writer, the way llama.cpp's converter writes one, so the importer is tested without a real checkpoint.

The keys are those transformers' GGUF loader reads: ``llama.*`` for the config, ``tokenizer.ggml.*``
for a byte-level BPE vocabulary (``gpt2``: tokens in the byte alphabet, merges, control tokens
marked type 3) and ``tokenizer.chat_template``. Tensors are F32 (the import is then exact) and named
by ``gguf``'s own table; llama.cpp stores q/k rows permuted for its RoPE layout, which the loader
undoes, so they are permuted here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from chat_families import build_tokenizer

TEXTS = ["What is the capital of France? Paris.", "Two plus two is four.", "Zürich 1234 + 89 = 1323"] * 4
# rms_norm_eps as float32 holds it: GGUF stores it in float32, the comparison is then bit for bit
ARCH = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=float(np.float32(1e-5)),
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def tiny_llama(tok, seed: int = 0):
    """A random LlamaForCausalLM for ``tok`` (norm weights random too, so their mapping is checked)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **ARCH)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: q/k rows from HF's half-split to interleaved RoPE pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_metadata(w, tok) -> None:
    backend = json.loads(tok.backend_tokenizer.to_str())
    vocab = sorted(backend["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["id"]: t["content"] for t in backend["added_tokens"]}
    tokens = [added.get(i, t) for t, i in vocab] + [added[i] for i in sorted(added) if i >= len(vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)


def write_gguf(model, tok, path: str | Path) -> Path:
    """Write ``model`` (a LlamaForCausalLM) and ``tok`` as an F32 GGUF file at ``path``."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    _tokenizer_metadata(w, tok)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        arr = t.detach().float().numpy()
        if ".q_proj." in hf_name:
            arr = _permute(arr, c.num_attention_heads)
        elif ".k_proj." in hf_name:
            arr = _permute(arr, c.num_key_value_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, f"gguf has no name for {hf_name}"
        w.add_tensor(name, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def tiny_gguf(tmp: Path, seed: int = 0):
    """``(gguf path, model, tokenizer)``: the ChatML tokenizer of tests.chat_families (qwen2 family:
    eos ``<|endoftext|>``, turns closed by ``<|im_end|>``) and a random tiny Llama, in one GGUF file."""
    tok = build_tokenizer("qwen2", TEXTS, tmp / "tokenizer", vocab_size=400)
    model = tiny_llama(tok, seed)
    return write_gguf(model, tok, tmp / "tiny-llama.F32.gguf"), model, tok
