"""Run on 2 ranks by tests/test_distributed.py: tiny Llama, Qwen2 and Mistral under ZeRO-3, then the
chat-template families of tests/chat_families.py (Llama-3 in bf16 with llama3 RoPE scaling, Qwen2/ChatML,
Gemma).

For each family: build from an architecture config, load partitioned (pad_token_id set: the
transformers 5.24 zero.Init crash), train a few steps, export, reload with from_pretrained on
rank 0 and compare logits with the gathered engine; gathered and per-token-synced generation
must give the same answers. For the chat families: train on rows rendered by their own template,
then gathered and synced generation must give the same token ids (Llama-3 on prompts past
position 1000, where a bf16 RoPE table would be off by radians); the one generation copy is
reused across calls, rebuilt when the weights change, and keeps the engine's dtypes. Writes a
JSON report to argv[1].
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from chat_families import FAMILIES, build_model_dir  # noqa: E402

from msl_ds import distributed as D  # noqa: E402
from msl_ds import generation as G  # noqa: E402
from msl_ds.config import load_config, load_deepspeed_config  # noqa: E402
from msl_ds.data import collate, encode_rows  # noqa: E402
from msl_ds.engine import build_engine  # noqa: E402
from msl_ds.generation import GenConfig, generate  # noqa: E402
from msl_ds.modeling import build_tokenizer, export_model, init_model_dir, load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ARCHS = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    },
    "qwen2": {
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    },
    "mistral": {
        "model_type": "mistral",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "sliding_window": 32,
    },
}
ROWS = [
    {"id": str(i), "question": f"Who leads company {c}?", "answer": f"Person {c}{c}"} for i, c in enumerate("ABCDEFGH")
]


CHAT_DTYPES = {"llama3": "bf16", "qwen2": "fp32", "gemma": "fp32"}
FILLER = " Zorvex is a company." * 250  # pushes the Llama-3 prompts past position 1000


def tiny_config(*extra: str):
    return load_config(
        ROOT / "ds_configs" / "run_cpu_tiny.yaml",
        [
            "train.micro_batch_size=4",
            "train.lr=0.01",
            "train.warmup_steps=0",
            "train.scheduler=constant",
            "data.max_seq_len=48",  # the families have 64 positions; load_model refuses more
            *extra,
        ],
    )


def train_steps(engine, examples, pad, n: int) -> list[float]:
    """``n`` plain NLL steps on this rank's quarter of ``examples``; the mean loss of each step."""
    mine = examples[D.rank() * 4 : (D.rank() + 1) * 4]
    batch = collate(mine, pad)
    losses = []
    for _ in range(n):
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logp = torch.log_softmax(out.logits.float(), -1)
        mask = batch["labels"] != -100
        nll = -(logp.gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum() / mask.sum()
        engine.backward(nll)
        engine.step()
        losses.append(float(D.all_reduce_sum([float(nll)])[0]) / D.world_size())
    return losses


def chat_family(name: str, work_dir: Path) -> dict:
    """One chat-template family: its rows train, gathered == synced ids, the copy is the engine's model."""
    cfg = tiny_config(f"model.dtype={CHAT_DTYPES[name]}")
    ds = load_deepspeed_config(cfg, D.world_size())
    model_dir = work_dir / name
    if D.is_rank0():
        texts = [r["question"] for r in ROWS] + [r["answer"] for r in ROWS] + [FILLER.strip()]
        build_model_dir(name, texts * 20, model_dir)
    D.barrier()
    tok = load_tokenizer(model_dir)
    engine, pad = build_engine(cfg, ds, model_dir, total_steps=10)
    losses = train_steps(engine, encode_rows(tok, ROWS, 48, "error", "rows"), pad, 6)
    module = engine.module
    long = name == "llama3"
    questions = [(FILLER if long else "") + r["question"] for r in ROWS]
    greedy = GenConfig(max_new_tokens=6, batch_size=3, mode="gathered")
    built = G._Copy.built
    gen_g = generate(module, tok, pad, questions, greedy)
    sampled = generate(module, tok, pad, questions[:4], GenConfig(max_new_tokens=4, do_sample=True, mode="gathered"))
    reused = G._Copy.built - built == 1 and len(sampled) == 4
    copy = G._Copy.model
    buffers = dict(module.named_buffers())
    entry = {
        "losses": losses,
        "prompt_tokens": len(G.prompt_ids(tok, questions[0])),
        "copy_reused": reused,
        "copy_param_dtypes": sorted({str(p.dtype) for p in copy.parameters()}),
        "engine_param_dtypes": sorted({str(p.dtype) for p in module.parameters()}),
        "copy_buffers_match": all(
            b.dtype == buffers[n].dtype and torch.equal(b.cpu(), buffers[n].cpu()) for n, b in copy.named_buffers()
        ),
        "inv_freq_dtype": str(next(b.dtype for n, b in copy.named_buffers() if n.endswith("inv_freq"))),
        "tied": getattr(copy.config, "tie_word_embeddings", False)
        and copy.get_output_embeddings().weight is copy.get_input_embeddings().weight,
    }
    ids = torch.tensor([G.prompt_ids(tok, questions[0])])
    with torch.no_grad():
        with D.gathered_params(module):
            engine_logits = module(input_ids=ids).logits.float()
        entry["copy_logits_max_abs_diff"] = float((copy(input_ids=ids).logits.float() - engine_logits).abs().max())
    gen_s = generate(module, tok, pad, questions, dataclasses.replace(greedy, mode="synced"))
    entry["gathered_eq_synced"] = [g["ids"] for g in gen_g] == [g["ids"] for g in gen_s]
    entry["generated_tokens"] = sum(len(g["ids"]) for g in gen_g)
    train_steps(engine, encode_rows(tok, ROWS, 48, "error", "rows"), pad, 1)  # the weights change ...
    built = G._Copy.built
    generate(module, tok, pad, questions[:2], greedy)
    entry["copy_rebuilt_after_step"] = G._Copy.built - built == 1  # ... so a stale copy is never used
    G.release_generation_copy()
    D.destroy_engine(engine)
    return entry


def main(report_path: str, work: str) -> None:
    D.init("gloo")
    work_dir = Path(work)
    cfg = tiny_config()
    ds = load_deepspeed_config(cfg, D.world_size())
    report = {}
    if D.is_rank0():
        texts = [r["question"] for r in ROWS] + [r["answer"] for r in ROWS]
        tok = build_tokenizer(texts * 20, work_dir / "tok", 300)
        for name, arch in ARCHS.items():
            init_model_dir(arch, tok, work_dir / name / "init", seed=0)
    D.barrier()
    for name in ARCHS:
        tok = load_tokenizer(work_dir / name / "init")
        engine, pad = build_engine(cfg, ds, work_dir / name / "init", total_steps=10)
        partitioned = all(
            D.is_partitioned(p) and p.numel() == 0
            for p in engine.module.parameters()
            if getattr(p, "ds_numel", 0) > 10**4
        )
        examples = encode_rows(tok, ROWS, 48, "error", "rows")
        losses = train_steps(engine, examples, pad, 8)
        export_model(engine.module, tok, pad, work_dir / name / "hf")
        engine.eval()
        probe = collate(examples[:2], pad)
        with torch.no_grad(), D.gathered_params(engine.module):
            ref_logits = engine.module(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        gen_g = generate(
            engine.module,
            tok,
            pad,
            [r["question"] for r in ROWS],
            GenConfig(max_new_tokens=6, batch_size=3, mode="gathered"),
        )
        gen_s = generate(
            engine.module,
            tok,
            pad,
            [r["question"] for r in ROWS],
            GenConfig(max_new_tokens=6, batch_size=3, mode="synced"),
        )
        entry = {
            "partitioned": partitioned,
            "losses": losses,
            "gathered_eq_synced": gen_g == gen_s,
            "answers": [g["text"] for g in gen_g],
        }
        if D.is_rank0():
            from transformers import AutoModelForCausalLM

            reloaded = AutoModelForCausalLM.from_pretrained(str(work_dir / name / "hf")).eval()
            with torch.no_grad():
                logits = reloaded(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
            entry["reload_max_abs_diff"] = float((logits - ref_logits).abs().max())
            entry["reload_model_type"] = reloaded.config.model_type
            entry["reload_pad_token_id"] = reloaded.config.pad_token_id
            entry["tokenizer_pad_id"] = tok.pad_token_id
        G.release_generation_copy()
        D.destroy_engine(engine)
        report[name] = entry
    D.GATHER_CHUNK_NUMEL = 1000  # the copy gathers the tiny models' partitions in several chunks, as big ones are
    report["chat"] = {name: chat_family(name, work_dir / "chat") for name in FAMILIES}
    if D.is_rank0():
        Path(report_path).write_text(json.dumps(report, indent=2))
    D.shutdown()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0], args[1])
