"""Training throughput: tokens/s, model FLOPs utilisation, step time and peak memory.

* tokens: every position a forward processed (rows x padded length: prompts, answers and
  padding) and the non-padding ones (``attention_mask``), summed over ranks.
* MFU: model FLOPs per processed token ``6 N + 12 L H T`` (the weight matmuls forward and
  backward, plus attention scores and values over a sequence of ``T``: PaLM's appendix B; the
  recomputation of gradient checkpointing is not counted, it is overhead) against the peak
  dense bf16/fp16 FLOP/s of the device times the number of ranks. The peak comes from
  ``monitor.peak_tflops`` when set, else from :data:`PEAK_TFLOPS` by device name; on a CPU
  without a configured peak no MFU is reported (NaN).
* peak memory: the device's peak allocated bytes since the last report (CUDA), or the process's
  peak resident set on a CPU (``ru_maxrss``, never reset).
"""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import dataclass

import torch

# dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s, by a substring of the device name
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
    "V100": 125.0,
}
GIB = float(1 << 30)


def device_peak_tflops(configured: float = 0.0) -> float:
    """Peak TFLOP/s per rank: ``configured`` when > 0, else the table's entry for this GPU (NaN if none)."""
    if configured > 0:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():  # most specific first (H100 PCIe before H100)
            if key in name:
                return value
    return float("nan")


def param_count(model) -> int:
    """Parameters of ``model`` (ZeRO-3 partitioned ones counted whole)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


def flops_per_token(n_params: int, layers: int, hidden: int, seq_len: float) -> float:
    """Model FLOPs per processed token, forward and backward (see the module docstring)."""
    return 6.0 * n_params + 12.0 * layers * hidden * seq_len


def peak_memory_gib(reset: bool = True) -> float:
    """Peak device memory (CUDA) or peak process RSS (CPU) in GiB."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = torch.cuda.max_memory_allocated() / GIB
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (GIB if sys.platform == "darwin" else GIB / 1024)


@dataclass
class Throughput:
    """Counts over a logging window; :meth:`report` turns them into rates and resets them."""

    n_params: int
    layers: int
    hidden: int
    world: int
    peak_tflops: float
    tokens: float = 0.0
    real_tokens: float = 0.0
    seq_sum: float = 0.0  # sum over forwards of tokens x padded length (for the mean sequence length)
    steps: int = 0

    @classmethod
    def for_model(cls, model, world: int, peak_tflops: float = 0.0) -> "Throughput":
        cfg = getattr(model, "config", None)
        cfg = getattr(cfg, "text_config", None) or cfg
        layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0) or 0)
        hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 0)
        return cls(param_count(model), layers, hidden, world, device_peak_tflops(peak_tflops))

    def add(self, tokens: float, real_tokens: float, seq_len: float) -> None:
        """One forward's (or the step's, summed over ranks) processed and non-padding tokens."""
        self.tokens += tokens
        self.real_tokens += real_tokens
        self.seq_sum += tokens * seq_len

    def report(self, seconds: float) -> dict[str, float]:
        """Rates over the window of ``seconds`` (wall clock of its steps), then a fresh window."""
        s = max(seconds, 1e-9)
        seq = self.seq_sum / self.tokens if self.tokens else 0.0
        flops = flops_per_token(self.n_params, self.layers, self.hidden, seq) * self.tokens
        mfu = flops / s / (self.peak_tflops * 1e12 * self.world) if math.isfinite(self.peak_tflops) else float("nan")
        out = {
            "tokens_per_s_all": self.tokens / s,
            "tokens_per_s_nonpad": self.real_tokens / s,
            "step_time_s": s / max(self.steps, 1),
            "mfu": mfu,
            "peak_mem_gib": peak_memory_gib(),
        }
        self.tokens = self.real_tokens = self.seq_sum = 0.0
        self.steps = 0
        return out
