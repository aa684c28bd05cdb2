"""Run on 2 ranks by tests/test_distributed.py: tiny Llama, Qwen2 and Mistral under ZeRO-3.

For each family: build from an architecture config, load partitioned (pad_token_id set: the
transformers 5.24 zero.Init crash), train a few steps, export, reload with from_pretrained on
rank 0 and compare logits with the gathered engine; gathered and per-token-synced generation
must give the same answers. Writes a JSON report to argv[1].
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from msl_ds import distributed as D  # noqa: E402
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


def main(report_path: str, work: str) -> None:
    D.init("gloo")
    work_dir = Path(work)
    cfg = load_config(
        ROOT / "ds_configs" / "run_cpu_tiny.yaml",
        [
            "train.micro_batch_size=4",
            "train.lr=0.01",
            "train.warmup_steps=0",
            "train.scheduler=constant",
            "data.max_seq_len=48",  # the families have 64 positions; load_model refuses more
        ],
    )
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
        mine = examples[D.rank() * 4 : (D.rank() + 1) * 4]
        batch = collate(mine, pad)
        losses = []
        for _ in range(8):
            out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            logp = torch.log_softmax(out.logits.float(), -1)
            mask = batch["labels"] != -100
            nll = -(logp.gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum() / mask.sum()
            engine.backward(nll)
            engine.step()
            losses.append(float(D.all_reduce_sum([float(nll)])[0]) / D.world_size())
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
        D.destroy_engine(engine)
        report[name] = entry
    if D.is_rank0():
        Path(report_path).write_text(json.dumps(report, indent=2))
    D.shutdown()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0], args[1])
