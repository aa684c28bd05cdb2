"""train.logprobs=fused_linear on its production path, on 2 ZeRO-3 CPU ranks (gloo).

Usage:
    python tests/scripts/zero3_fused_head.py            # spawns 2 ranks itself

Every case builds its engine the way a run does (``msl_ds.engine.build_engine``: a tiny Hugging
Face Llama loaded from disk partitioned by ZeRO-3, transformers' gradient checkpointing, the run
config's DeepSpeed JSON ``zero3.json`` with its precision filled in) and takes the answer
log-probs through ``msl_ds.logprobs.AnswerLogprobs``, which installs the fused head on the
engine's lm-head (``install_fused_head``) and checks it against the logits path on the first
batch. For tied and untied embeddings, fp32 and bf16, the same rows (each rank its own) go
through ``train.logprobs=logits`` and ``train.logprobs=fused_linear`` on two engines built from
the same weights; the log-probs and every parameter's full gradient (``safe_get_full_grad``,
the rank-averaged gradient) must agree, for two optimizer steps (the second under ZeRO-3's
recorded prefetch trace, after an AdamW step that must also agree).

Last, a model whose forward multiplies the lm-head's output (as Falcon-H1's
``lm_head_multiplier`` does) must be refused on the first batch by ``fused_linear`` on every
rank, with an error naming ``train.logprobs=logits``.

Rank 0 prints one line per case and ``FUSED HEAD OK``; the exit code is 0 on success.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

WORLD = 2
V, ROWS, T = 97, 3, 14
CONFIG = os.path.join(ROOT, "ds_configs", "run_cpu_tiny.yaml")
# fused vs logits (bit-identical on CPU so far): fp32 sums in another order; bf16 one rounding (2^-7)
TOL = {"fp32": dict(rtol=1e-4, atol=1e-6), "bf16": dict(rtol=8e-3, atol=1e-5)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch() -> int:
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="msl_fused_head_")
    procs = []
    for r in range(WORLD):
        env = dict(
            os.environ,
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE=str(WORLD),
            LOCAL_WORLD_SIZE=str(WORLD),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONWARNINGS="ignore",
            MSL_FUSED_HEAD_DIR=tmp,
        )
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__)], env=env))
    rcs = [p.wait(timeout=900) for p in procs]
    print(f"rank exit codes: {rcs}")
    subprocess.run(["rm", "-rf", tmp], check=False)
    return 0 if all(rc == 0 for rc in rcs) else 1


def scaled_llama_classes():
    """A Llama whose causal-LM head multiplies its logits (the shape of Falcon-H1's), registered
    with transformers' Auto classes so that ``load_model`` builds it from its directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    class ScaledHeadConfig(LlamaConfig):
        model_type = "msl_scaled_head_llama"

        def __init__(self, lm_head_multiplier: float = 1.0, **kw):
            self.lm_head_multiplier = lm_head_multiplier
            super().__init__(**kw)

    class ScaledHeadLlama(LlamaForCausalLM):
        config_class = ScaledHeadConfig

        def forward(self, *args, **kw):
            out = super().forward(*args, **kw)
            out.logits = out.logits * self.config.lm_head_multiplier
            return out

    try:
        AutoConfig.register(ScaledHeadConfig.model_type, ScaledHeadConfig)
        AutoModelForCausalLM.register(ScaledHeadConfig, ScaledHeadLlama)
    except ValueError:  # already registered in this process
        pass
    return ScaledHeadConfig, ScaledHeadLlama


def write_models(tmp: str) -> None:
    """Rank 0 writes the tiny models (fp32 weights; each case loads them in its dtype)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = dict(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
    )  # fmt: skip
    for tied in (False, True):
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(tie_word_embeddings=tied, **arch)).save_pretrained(f"{tmp}/tied_{tied}")
    config_cls, model_cls = scaled_llama_classes()
    torch.manual_seed(0)
    model_cls(config_cls(lm_head_multiplier=2.0, tie_word_embeddings=False, **arch)).save_pretrained(f"{tmp}/scaled")


def batch(rank: int, step: int):
    """Right-padded rows with answers after a prompt, different on every rank and step."""
    import torch

    g = torch.Generator().manual_seed(100 * rank + step)
    ids = torch.randint(1, V, (ROWS, T), generator=g)
    attn = torch.ones(ROWS, T, dtype=torch.long)
    attn[1, 10:] = 0
    labels = torch.full((ROWS, T), -100)
    labels[:, 4:-1] = ids[:, 5:]
    labels[1, 9:] = -100
    weights = torch.rand(ROWS, generator=g) + 0.5
    return ids, attn, labels, weights


def build(model_dir: str, dtype: str, mode: str):
    from msl_ds import distributed as D
    from msl_ds.config import load_config, load_deepspeed_config
    from msl_ds.engine import build_engine
    from msl_ds.logprobs import AnswerLogprobs

    cfg = load_config(
        CONFIG,
        [
            f"model.path={model_dir}",
            f"model.dtype={dtype}",
            f"train.logprobs={mode}",
            "train.gradient_checkpointing=true",
            f"train.micro_batch_size={ROWS}",
            "train.grad_accum=1",
            "train.lr=1e-2",
            "train.warmup_steps=0",
            "data.max_seq_len=64",
        ],
    )
    engine, _ = build_engine(cfg, load_deepspeed_config(cfg, D.world_size()), model_dir, total_steps=4)
    return engine, AnswerLogprobs(engine, cfg.train.logprobs)


def train_steps(model_dir: str, dtype: str, mode: str, steps: int = 2):
    """Per step: the log-probs and every parameter's full gradient (then the step is applied);
    last, the full parameters after the final step."""
    from deepspeed.utils import safe_get_full_grad

    from msl_ds import distributed as D

    engine, answer = build(model_dir, dtype, mode)
    rank = D.rank()
    out = []
    for step in range(steps):
        ids, attn, labels, weights = batch(rank, step)
        logps, n_tokens = answer(ids, attn, labels)
        loss = -(logps * weights).sum() / n_tokens.sum()
        engine.backward(loss)
        grads = {name: safe_get_full_grad(p).float().clone() for name, p in engine.module.named_parameters()}
        out.append((logps.detach().float().clone(), grads))
        engine.step()
    with D.gathered_params(engine.module):
        params = {name: p.detach().float().clone() for name, p in engine.module.named_parameters()}
    tied = engine.module.get_output_embeddings().weight is engine.module.get_input_embeddings().weight
    D.destroy_engine(engine)
    return out, params, tied


def compare(case: str, dtype: str, ref, got) -> list[str]:
    import torch

    errors = []
    (ref_steps, ref_params, _), (got_steps, got_params, _) = ref, got
    tol = TOL[dtype]
    for step, ((lp_r, g_r), (lp_f, g_f)) in enumerate(zip(ref_steps, got_steps)):
        if not torch.allclose(lp_f, lp_r, **tol):
            errors.append(f"{case} step {step}: log-probs {lp_f.tolist()} vs {lp_r.tolist()}")
        for name, r in g_r.items():
            f = g_f[name]
            scale = r.abs().max().item()
            err = (f - r).abs().max().item()
            if scale == 0.0:
                errors.append(f"{case} step {step} {name}: gradient is all zero")
            elif not torch.allclose(f, r, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * scale):
                errors.append(f"{case} step {step} {name}: max err {err:.3g} (largest element {scale:.3g})")
    for name, r in ref_params.items():
        if not torch.allclose(got_params[name], r, **tol):
            errors.append(f"{case}: {name} after the steps differs by {(got_params[name] - r).abs().max().item():.3g}")
    return errors


def guard_case(tmp: str) -> list[str]:
    """The scaled-head model is refused on the first batch, on every rank alike."""
    from msl_ds import distributed as D
    from msl_ds.logprobs import LogprobsError

    scaled_llama_classes()
    engine, answer = build(f"{tmp}/scaled", "fp32", "fused_linear")
    ids, attn, labels, _ = batch(D.rank(), 0)
    try:
        answer(ids, attn, labels)
        return ["scaled head: fused_linear was not refused"]
    except LogprobsError as exc:
        msg = str(exc)
        if "train.logprobs=logits" not in msg or "lm-head" not in msg:
            return [f"scaled head: the error does not name the fix: {msg}"]
        if D.rank() == 0:
            print(f"[rank 0] scaled head refused: {msg}", flush=True)
        return []
    finally:
        D.destroy_engine(engine)


def worker() -> int:
    from msl_ds import distributed as D

    D.init("gloo", threads_per_rank=1)
    tmp = os.environ["MSL_FUSED_HEAD_DIR"]
    if D.rank() == 0:
        write_models(tmp)
    D.barrier()
    errors: list[str] = []
    for tied in (False, True):
        for dtype in ("fp32", "bf16"):
            case = f"{'tied' if tied else 'untied'} {dtype}"
            ref = train_steps(f"{tmp}/tied_{tied}", dtype, "logits")
            got = train_steps(f"{tmp}/tied_{tied}", dtype, "fused_linear")
            if got[2] is not tied:
                errors.append(f"{case}: the engine's lm-head tie is {got[2]}, expected {tied}")
            case_errors = compare(case, dtype, ref, got)
            errors += case_errors
            if D.rank() == 0:
                worst = max(
                    (g_f[n] - g_r[n]).abs().max().item() for (_, g_r), (_, g_f) in zip(ref[0], got[0]) for n in g_r
                )
                print(
                    f"[rank 0] {case}: {'ok' if not case_errors else 'FAILED'} (max grad diff {worst:.3g})", flush=True
                )
    errors += guard_case(tmp)
    for e in errors:
        print(f"[rank {D.rank()}] {e}", flush=True)
    failed = D.all_reduce_sum([float(len(errors))])[0]
    if D.rank() == 0 and not failed:
        print("FUSED HEAD OK", flush=True)
    D.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    if "RANK" not in os.environ:
        sys.exit(launch())
    sys.exit(worker())
