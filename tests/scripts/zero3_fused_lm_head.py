"""ZeRO-3 check for msl_ds.kernels.FusedLMHeadLogprobs on 2 CPU ranks (gloo).

Usage:
    python tests/scripts/zero3_fused_lm_head.py            # spawns 2 ranks itself
    deepspeed --num_gpus 2 --master_port 29731 tests/scripts/zero3_fused_lm_head.py   # or via the DeepSpeed launcher

Each rank builds a tiny model (embedding -> linear -> tanh -> FusedLMHeadLogprobs(nn.Linear))
under ``deepspeed.zero.Init`` with every parameter partitioned
(``stage3_param_persistence_threshold=0``), runs ``deepspeed.initialize`` with ZeRO stage 3
and torch AdamW, computes the preference loss on its own micro-batch and calls
``engine.backward``.  The full gradients (``safe_get_full_grad``) of all parameters,
in particular the lm_head weight, are compared with a single-process plain-PyTorch
computation of the rank-averaged gradient; then ``engine.step()`` is compared with a
plain AdamW step and a second forward/backward (ZeRO-3's traced/prefetch mode) is
checked again.  Prints ``ZERO3 OK`` on rank 0 and exits 0 on success.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

WORLD = 2
V, H, N, T = 97, 16, 4, 12
LR = 1e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch() -> int:
    port = _free_port()
    procs = []
    for r in range(WORLD):
        env = dict(
            os.environ,
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE=str(WORLD),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONWARNINGS="ignore",
        )
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__)], env=env))
    rcs = [p.wait(timeout=900) for p in procs]
    print(f"rank exit codes: {rcs}")
    return 0 if all(rc == 0 for rc in rcs) else 1


def worker() -> int:
    from msl_ds import distributed as D

    D.init("gloo", threads_per_rank=1)  # the library's start and end: the process group is destroyed
    ok = True
    for build in ("zero_init", "plain"):
        ok = run_case(build) and ok
    D.shutdown()  # before interpreter finalization (an abort at exit would fail a passing check)
    return 0 if ok else 1


def run_case(build: str) -> bool:
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_grad
    from torch import nn

    from msl_ds.kernels import ROLE_ALIGNED, ROLE_CONFLICT, ROLE_GOLD, FusedLMHeadLogprobs, LossConfig
    from msl_ds.kernels.losses import preference_loss_from_logps

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])

    cfg_loss = LossConfig(nll_weight=1.0, pp_weight=0.5, np_weight=0.5, form="sigmoid", dpo=0.3)

    class Tiny(nn.Module):
        def __init__(self, fused=True):
            super().__init__()
            self.fused = fused
            self.embed = nn.Embedding(V, H)
            self.proj = nn.Linear(H, H)
            self.head = FusedLMHeadLogprobs(nn.Linear(H, V, bias=False), chunk_tokens=7, chunk_vocab=40)

        def forward(self, ids, targets, mask, roles, ref, ci, ri):
            hidden = torch.tanh(self.proj(self.embed(ids)))
            if self.fused:
                logps, n_tok = self.head(hidden, targets, mask)
            else:  # plain PyTorch reference: nn.Linear + fp32 log_softmax + gather
                logits = self.head.lm_head(hidden).float()
                tok = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
                logps, n_tok = (tok * mask).sum(-1), mask.sum(-1).float()
            loss, _ = preference_loss_from_logps(logps, n_tok, roles, ref, cfg_loss, chosen_idx=ci, rejected_idx=ri)
            return loss

    def batch(r, step):
        g = torch.Generator().manual_seed(1000 * step + r)
        ids = torch.randint(0, V, (N, T), generator=g)
        targets = torch.randint(0, V, (N, T), generator=g)
        mask = torch.rand(N, T, generator=g) > 0.3
        mask[:, :2] = False
        roles = torch.tensor([ROLE_GOLD, ROLE_ALIGNED, ROLE_CONFLICT, ROLE_ALIGNED])
        ref = -torch.rand(N, generator=g) * 40
        return ids, targets, mask, roles, ref, torch.tensor([1, 3]), torch.tensor([2, 2])

    torch.manual_seed(0)
    ref_model = Tiny(fused=False)  # identical on both ranks
    ds_config = {
        "train_micro_batch_size_per_gpu": N,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": 1000,
            "stage3_max_live_parameters": 10000,
            "reduce_bucket_size": 1000,
        },
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if build == "zero_init":
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = Tiny(fused=True)
        # copy the reference weights into the partitioned model
        for (_, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(q.data)
        w = model.head.lm_head.weight
        assert hasattr(w, "ds_id"), "lm_head weight is not a ZeRO-3 parameter"
        assert w.ds_tensor.numel() < w.ds_numel, "lm_head weight is not partitioned"
        assert id(w) in getattr(model.head, "_external_params", {}), "lm_head weight not registered as external param"
    else:  # plain model partitioned by deepspeed.initialize; DeepSpeed registers the weight on first access
        model = copy.deepcopy(ref_model)
        model.fused = True

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    w = engine.module.head.lm_head.weight
    assert w.ds_tensor.numel() < w.ds_numel, "lm_head weight is not partitioned"
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=LR, weight_decay=0.01)

    def ref_grads(step):
        ref_model.zero_grad()
        losses = []
        for r in range(WORLD):
            loss = ref_model(*batch(r, step)) / WORLD  # DP averaging
            loss.backward()
            losses.append(loss.item() * WORLD)
        return {n: p.grad.detach().clone() for n, p in ref_model.named_parameters()}, losses

    ok = True
    for step in range(2):
        loss = engine(*batch(rank, step))
        engine.backward(loss)
        expected, ref_losses = ref_grads(step)
        if abs(loss.item() - ref_losses[rank]) > 1e-5:
            print(f"[rank {rank}] step {step} loss {loss.item()} != ref {ref_losses[rank]}")
            ok = False
        for name, p in engine.module.named_parameters():
            g = safe_get_full_grad(p)
            if g is None:
                print(f"[rank {rank}] step {step} {name}: no gradient")
                ok = False
                continue
            e = expected[name]
            err = (g.float() - e).abs().max().item()
            if g.shape != e.shape or not torch.allclose(g.float(), e, atol=1e-6, rtol=1e-4):
                print(f"[rank {rank}] step {step} {name}: max err {err}")
                ok = False
            elif g.abs().max().item() == 0.0:
                print(f"[rank {rank}] step {step} {name}: gradient is all zero")
                ok = False
            elif rank == 0:
                print(f"[rank 0] {build} step {step} grad {name} {tuple(g.shape)} max err {err:.2e}")
        engine.step()
        ref_opt.step()
        for (name, p), (_, q) in zip(engine.module.named_parameters(), ref_model.named_parameters()):
            with deepspeed.zero.GatheredParameters([p]):
                err = (p.data.float() - q.data).abs().max().item()
                if err > 1e-5:
                    print(f"[rank {rank}] step {step} param {name} after AdamW step: max err {err}")
                    ok = False
    torch.distributed.barrier()
    if ok and rank == 0:
        print(f"ZERO3 OK ({build})")
    engine.destroy()
    return ok


if __name__ == "__main__":
    if "RANK" not in os.environ:
        sys.exit(launch())
    sys.exit(worker())
