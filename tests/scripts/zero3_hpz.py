"""ZeRO++ hpZ (``zero_hpz_partition_size: 2``) on 4 CPU ranks as 2 "nodes" of 2, against plain ZeRO-3.

Usage:
    python tests/scripts/zero3_hpz.py            # spawns 4 ranks itself

The ranks are started as two nodes of two (``LOCAL_RANK`` 0-1 and ``LOCAL_WORLD_SIZE=2`` on
each); DeepSpeed forms hpZ's secondary groups from consecutive global ranks
(``deepspeed.utils.groups._create_zero_param_parallel_group``: ranks ``[0, 1]`` and ``[2, 3]``), which
is a node's ranks under every launcher msl_ds supports (they number a node's ranks
consecutively). Each variant builds its engine as a run does (``msl_ds.engine.build_engine``:
a tiny Hugging Face Llama loaded partitioned, ``zero3.json`` plus the variant's keys, gradient
checkpointing, fp32 by default, ``bf16`` as an argument) and trains 2 optimizer steps, every rank
on its own rows, saving a checkpoint after step 1 through ``msl_ds.distributed.save_checkpoint``.
Then a fresh engine (from the initial weights again) loads that checkpoint and runs step 2.

Checked, on every rank: each step's loss and every parameter's full gradient
(``safe_get_full_grad``) and the parameters after the last step equal plain ZeRO-3's, for the
uninterrupted run and for the resumed one (the resumed forward must see the checkpoint's weights
in hpZ's secondary copy, not the initial ones: DeepSpeed #7606, fixed in 0.18.3 by #7707).

Each variant builds two engines in one process, as a multi-stage run does: that needs
``msl_ds.distributed.reuse_hpz_group`` (DeepSpeed's ``zero.Init`` refuses to create hpZ's groups
twice, DeepSpeed #4901). MiCS (``mics_shard_size``) is not tested: DeepSpeed 0.19.8 refuses the key
("MiCS ZeRO-3 sharding has been removed", DeepSpeed #8489).

Rank 0 prints one line per variant and ``HPZ OK``; the exit code is 0 on success.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

WORLD, PER_NODE = 4, 2
V, ROWS, T, STEPS, SAVE_AT = 97, 2, 12, 2, 1
CONFIG = os.path.join(ROOT, "ds_configs", "run_cpu_tiny.yaml")
ZERO3 = os.path.join(ROOT, "ds_configs", "zero3.json")
# hpZ and plain ZeRO-3 gather the same values and reduce the same gradients (the reduce-scatter
# runs over all ranks in both): equal up to the order of fp32 sums
TOL = {"fp32": dict(rtol=1e-5, atol=1e-7), "bf16": dict(rtol=1e-2, atol=1e-5)}
VARIANTS = {"zero3": {}, "hpz2": {"zero_hpz_partition_size": PER_NODE}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(dtypes: list[str]) -> int:
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="msl_hpz_")
    procs = []
    for r in range(WORLD):
        env = dict(
            os.environ,
            RANK=str(r),
            LOCAL_RANK=str(r % PER_NODE),
            WORLD_SIZE=str(WORLD),
            LOCAL_WORLD_SIZE=str(PER_NODE),
            GROUP_RANK=str(r // PER_NODE),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONWARNINGS="ignore",
            MSL_HPZ_DIR=tmp,
            MSL_HPZ_DTYPES=",".join(dtypes),
        )
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__)], env=env))
    rcs = [p.wait(timeout=1200) for p in procs]
    print(f"rank exit codes: {rcs}")
    subprocess.run(["rm", "-rf", tmp], check=False)
    return 0 if all(rc == 0 for rc in rcs) else 1


def write_files(tmp: str) -> None:
    """Rank 0: the tiny model and one DeepSpeed JSON per variant (zero3.json plus its keys)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(f"{tmp}/model")
    base = json.loads(open(ZERO3, encoding="utf-8").read())
    for name, keys in VARIANTS.items():
        ds = json.loads(json.dumps(base))
        ds["zero_optimization"].update(keys)
        # every parameter partitioned (none kept whole as "persistent"): the secondary copy covers them all
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        with open(f"{tmp}/{name}.json", "w", encoding="utf-8") as f:
            json.dump(ds, f)


def batch(rank: int, step: int):
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(1, V, (ROWS, T), generator=g)
    attn = torch.ones(ROWS, T, dtype=torch.long)
    attn[1, 9:] = 0
    labels = torch.full((ROWS, T), -100)
    labels[:, 3:-1] = ids[:, 4:]
    labels[1, 8:] = -100
    return ids, attn, labels


def build(tmp: str, variant: str, dtype: str):
    from msl_ds import distributed as D
    from msl_ds.config import load_config, load_deepspeed_config
    from msl_ds.engine import build_engine
    from msl_ds.logprobs import AnswerLogprobs

    cfg = load_config(
        CONFIG,
        [
            f"model.path={tmp}/model",
            f"model.dtype={dtype}",
            f"deepspeed.config={tmp}/{variant}.json",
            "train.gradient_checkpointing=true",
            f"train.micro_batch_size={ROWS}",
            "train.grad_accum=1",
            "train.lr=1e-2",
            "train.warmup_steps=0",
            "data.max_seq_len=64",
        ],
    )
    ds = load_deepspeed_config(cfg, D.world_size())
    engine, _ = build_engine(cfg, ds, f"{tmp}/model", total_steps=STEPS)
    return engine, AnswerLogprobs(engine, "logits")


def run_steps(engine, answer, steps, save: str | None = None) -> list[tuple[float, dict]]:
    """``(loss, full gradients)`` of each step in ``steps`` (the step then applied)."""
    from deepspeed.utils import safe_get_full_grad

    from msl_ds import distributed as D

    out = []
    for step in steps:
        logps, n = answer(*batch(D.rank(), step))
        loss = -logps.sum() / n.sum()
        engine.backward(loss)
        out.append(
            (loss.item(), {k: safe_get_full_grad(p).float().clone() for k, p in engine.module.named_parameters()})
        )
        engine.step()
        if save and step + 1 == SAVE_AT:
            D.save_checkpoint(engine, save, f"step_{SAVE_AT}", {"step": SAVE_AT})
            D.barrier()
    return out


def full_params(engine) -> dict:
    from msl_ds import distributed as D

    with D.gathered_params(engine.module):
        return {k: p.detach().float().clone() for k, p in engine.module.named_parameters()}


def variant_run(tmp: str, variant: str, dtype: str) -> dict:
    """The uninterrupted run (saving at SAVE_AT) and the run resumed from that checkpoint."""
    from msl_ds import distributed as D

    ckpt = f"{tmp}/ckpt_{variant}_{dtype}"
    engine, answer = build(tmp, variant, dtype)
    hpz = engine.zero_optimization_partition_weights() and engine._config.zero_config.zero_hpz_partition_size
    secondary = [getattr(p, "ds_secondary_tensor", None) is not None for p in engine.module.parameters()]
    steps = run_steps(engine, answer, range(STEPS), save=ckpt)
    params = full_params(engine)
    D.destroy_engine(engine)
    engine, answer = build(tmp, variant, dtype)  # fresh: the initial weights until the load
    state = D.load_checkpoint(engine, ckpt, f"step_{SAVE_AT}")
    resumed = run_steps(engine, answer, range(state["step"], STEPS))
    resumed_params = full_params(engine)
    D.destroy_engine(engine)
    return dict(
        steps=steps, params=params, resumed=resumed, resumed_params=resumed_params, hpz=hpz, secondary=secondary
    )


def compare(what: str, ref_steps, ref_params, steps, params, first_step: int, tol: dict) -> list[str]:
    import torch

    errors = []
    for i, ((loss_r, g_r), (loss, g)) in enumerate(zip(ref_steps[first_step:], steps)):
        step = first_step + i
        if abs(loss - loss_r) > tol["atol"] + tol["rtol"] * abs(loss_r):
            errors.append(f"{what} step {step}: loss {loss} vs plain ZeRO-3 {loss_r}")
        for k, r in g_r.items():
            scale = r.abs().max().item()
            if not torch.allclose(g[k], r, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * scale):
                errors.append(f"{what} step {step} {k}: gradient differs by {(g[k] - r).abs().max().item():.3g}")
    for k, r in ref_params.items():
        if not torch.allclose(params[k], r, **tol):
            errors.append(f"{what}: {k} after step {STEPS} differs by {(params[k] - r).abs().max().item():.3g}")
    return errors


def worker() -> int:
    from msl_ds import distributed as D

    D.init("gloo", threads_per_rank=1)
    tmp = os.environ["MSL_HPZ_DIR"]
    if D.rank() == 0:
        write_files(tmp)
    D.barrier()
    errors: list[str] = []
    for dtype in os.environ.get("MSL_HPZ_DTYPES", "fp32").split(","):
        runs = {v: variant_run(tmp, v, dtype) for v in VARIANTS}
        ref = runs["zero3"]  # it must resume exactly itself, or the comparison below means nothing
        errors += compare(
            f"zero3 {dtype} resumed", ref["steps"], ref["params"], ref["resumed"], ref["resumed_params"], SAVE_AT,
            TOL[dtype],
        )  # fmt: skip
        for v in VARIANTS:
            if v == "zero3":
                continue
            run = runs[v]
            if not run["hpz"] or not all(run["secondary"]):
                errors.append(
                    f"{v} {dtype}: hpZ is not on (partition size {run['hpz']}, secondary copies {run['secondary']})"
                )
            errs = compare(f"{v} {dtype}", ref["steps"], ref["params"], run["steps"], run["params"], 0, TOL[dtype])
            errs += compare(
                f"{v} {dtype} resumed", ref["steps"], ref["params"], run["resumed"], run["resumed_params"], SAVE_AT,
                TOL[dtype],
            )  # fmt: skip
            errors += errs
            if D.rank() == 0:
                losses = [round(loss, 6) for loss, _ in run["steps"]]
                print(f"[rank 0] {v} {dtype}: {'ok' if not errs else 'FAILED'} (losses {losses})", flush=True)
    for e in errors:
        print(f"[rank {D.rank()}] {e}", flush=True)
    failed = D.all_reduce_sum([float(len(errors))])[0]
    if D.rank() == 0 and not failed:
        print("HPZ OK", flush=True)
    D.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    if "RANK" not in os.environ:
        sys.exit(launch(sys.argv[1:] or ["fp32"]))
    sys.exit(worker())
