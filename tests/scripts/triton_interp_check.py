"""Run the Triton kernels of msl_ds.kernels through the Triton interpreter on CPU.

``TRITON_INTERPRET=1`` must be set before ``triton.language`` is imported (its own
``@triton.jit`` helpers such as ``tl.max`` are decorated at import time), so this runs
in a fresh process; ``tests/test_kernels.py`` launches it with ``subprocess``.

Usage: python tests/scripts/triton_interp_check.py [--seed S]
Exit code 0 when every check passes; failures are printed with the seed.
"""

import argparse
import os
import random
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "1"

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/ (for test_kernels helpers)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # repo root

import torch  # noqa: E402
import triton.language  # noqa: E402,F401  (imported *after* TRITON_INTERPRET=1)
from test_kernels import (  # noqa: E402
    check_fused_linear,
    check_fused_linear_masked_first_chunk,
    check_logprob_fn,
    check_masked_first_block,
)

from msl_ds.kernels import sequence_logprobs  # noqa: E402
from msl_ds.kernels import triton_logprob as tlp  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--only", default=None, help="run the cases whose name contains this text")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    print(f"MSL_TEST_SEED={seed}")

    def small_block(x, t, m, inplace):
        return tlp.triton_sequence_logprobs(x, t, m, inplace_backward=inplace, block_v=32)

    def via_api(x, t, m, inplace):
        return sequence_logprobs(x, t, m, backend="triton", inplace_backward=inplace)

    cases = [
        ("fp32 (3,47,123) block 32", small_block, dict(N=3, T=47, V=123, dtype=torch.float32)),
        ("bf16 (3,47,123) block 32", small_block, dict(N=3, T=47, V=123, dtype=torch.bfloat16)),
        ("fp32 in-place (2,9,70)", via_api, dict(N=2, T=9, V=70, dtype=torch.float32, inplace=True)),
        ("bf16 in-place (2,9,70)", via_api, dict(N=2, T=9, V=70, dtype=torch.bfloat16, inplace=True)),
        (
            "bf16 non-contiguous logits[:, :-1] (2,9,70)",
            via_api,
            dict(N=2, T=9, V=70, dtype=torch.bfloat16, noncontig=True),
        ),
    ]

    def fused_linear(dtype, bias, chunk_tokens, keep_blocks=0):
        def run(*_args, **_kw):
            check_fused_linear(
                seed,
                dtype,
                bias,
                backend="triton",
                chunk_tokens=chunk_tokens,
                chunk_vocab=50,
                keep_blocks=keep_blocks,
            )

        return run

    cases += [
        ("fused-linear fp32 bias, 7x50 blocks", fused_linear(torch.float32, True, 7), {}),
        ("fused-linear bf16, one token chunk", fused_linear(torch.bfloat16, False, 10**6), {}),
        ("fused-linear bf16 bias, 7x50 blocks", fused_linear(torch.bfloat16, True, 7), {}),
        ("fused-linear fp32 bias, 7x50 blocks, 3 kept", fused_linear(torch.float32, True, 7, keep_blocks=3), {}),
    ]
    cases += [
        (
            "fp32 first vocab block all -inf (2,5,70) block 32",
            lambda: check_masked_first_block(
                lambda x, t, m: tlp.triton_sequence_logprobs(x, t, m, block_v=32), torch.float32, 32, seed
            ),
            {},
        ),
        (
            "fused-linear fp32, first vocab chunks -inf",
            lambda: check_fused_linear_masked_first_chunk(seed, "triton"),
            {},
        ),
    ]

    def refuses_bad_target():
        x, t, m = torch.randn(2, 4, 40), torch.randint(0, 40, (2, 4)), torch.ones(2, 4, dtype=torch.bool)
        t[1, 2] = 40
        try:
            tlp.triton_sequence_logprobs(x, t, m)
        except ValueError as exc:
            assert "target id 40 at row 1, position 2" in str(exc), exc
        else:
            raise AssertionError("an out-of-range target id was not refused")

    cases += [("out-of-range target id refused", refuses_bad_target, {})]
    only = [c for c in cases if args.only is None or args.only in c[0]]
    failed = 0
    for name, fn, kw in only:
        try:
            if kw:
                N, T, V, dtype = kw.pop("N"), kw.pop("T"), kw.pop("V"), kw.pop("dtype")
                check_logprob_fn(fn, N, T, V, dtype, seed, **kw)
            else:
                fn()
            print(f"PASS {name}")
        except Exception:
            failed += 1
            print(f"FAIL {name} (seed={seed})")
            traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
