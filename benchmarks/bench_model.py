"""A randomly initialised Llama-shaped model directory of any size, for the benchmarks.

    python benchmarks/bench_model.py --out /tmp/llama1b --preset 1b          # ~1.2B, V = 128,256
    python benchmarks/bench_model.py --out /tmp/tiny --hidden 64 --layers 2 --vocab 2048

The tokenizer is the tiny world's (SentencePiece BPE trained on its questions and answers, with the
toy chat template), padded with added tokens ``<pad_NNNNNN>`` up to ``--vocab``, so that the whole
pipeline (world rows, chat template, generation, decoding) runs on a model with a real-size
vocabulary and lm-head: every id the model can produce decodes. The weights are a random init
(seeded), written as safetensors in ``--dtype``. Nothing here is trained; the directory is for
throughput and memory, not quality.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Llama-3.2-1B's shape (tied embeddings): 1.24B parameters, 0.26B of them the embedding / lm-head
PRESETS = {
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, positions=4096, tie=True),
}
DEFAULTS = dict(hidden=192, layers=4, heads=4, kv_heads=4, intermediate=0, vocab=0, positions=128, tie=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The size arguments (shared with the benchmarks that build their model themselves)."""
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a named shape (overrides the sizes)")
    p.add_argument("--hidden", type=int, default=DEFAULTS["hidden"])
    p.add_argument("--layers", type=int, default=DEFAULTS["layers"])
    p.add_argument("--heads", type=int, default=DEFAULTS["heads"])
    p.add_argument("--kv-heads", type=int, default=DEFAULTS["kv_heads"])
    p.add_argument("--intermediate", type=int, default=DEFAULTS["intermediate"], help="0: hidden x 8/3")
    p.add_argument("--vocab", type=int, default=DEFAULTS["vocab"], help="0: the tiny world tokenizer's own")
    p.add_argument("--positions", type=int, default=DEFAULTS["positions"], help="max_position_embeddings")
    p.add_argument("--tie", action="store_true", help="tie the lm-head to the input embedding")


def sizes(a: argparse.Namespace) -> dict:
    """The architecture the arguments ask for (a preset wins over the single sizes)."""
    s = dict(PRESETS[a.preset]) if a.preset else dict(
        hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads, intermediate=a.intermediate,
        vocab=a.vocab, positions=a.positions, tie=a.tie,
    )  # fmt: skip
    s["intermediate"] = s["intermediate"] or s["hidden"] * 8 // 3
    return s


def world_tokenizer(out: Path, vocab: int):
    """The tiny world's tokenizer, padded with added tokens to ``vocab`` entries (when larger)."""
    from msl_ds.modeling import build_tokenizer
    from msl_ds.world import generate_world

    world = generate_world("tiny", seed=0)
    texts = [r[k] for stage in world.stages for r in stage["train"] for k in ("question", "answer")]
    tok = build_tokenizer(texts, out, 1200)
    if vocab > len(tok):
        tok.add_tokens([f"<pad_{i:06d}>" for i in range(vocab - len(tok))])
        tok.save_pretrained(str(out))
    return tok


def write_model(out: str | Path, s: dict, dtype: str = "bf16", seed: int = 0) -> Path:
    """Write the tokenizer and a random-init Llama of shape ``s`` to ``out``; returns ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from msl_ds.modeling import DTYPES

    out = Path(out)
    tok = world_tokenizer(out, s["vocab"])
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=s["positions"],
        tie_word_embeddings=s["tie"],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a 1B init takes seconds on a GPU, minutes on a CPU
    with torch.device(device):
        model = LlamaForCausalLM(config).to(DTYPES[dtype])
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    n = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    (out / "BENCH_MODEL.txt").write_text(f"random init, seed {seed}, {n} parameters, {s}\n", encoding="utf-8")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--seed", type=int, default=0)
    add_arguments(p)
    a = p.parse_args()
    out = write_model(a.out, sizes(a), a.dtype, a.seed)
    print((out / "BENCH_MODEL.txt").read_text(encoding="utf-8").strip())


if __name__ == "__main__":
    main()
