"""Throughput accounting and the run's metrics file.

FLOP convention (PaLM's): a trained token costs 6·N + 12·L·H·d·T FLOPs, where N counts the
parameters that multiply activations (every projection and the output head, not the embedding
lookup), L the layers, H·d the query width and T the sequence length (attention scores and
values, forward and backward, causal masking not discounted). MFU is achieved FLOP/s over the
matrix-multiply peak, in the precision the run computes in (bf16, or float32 where it trains in
float32), measured on the same processes at the start of the run.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from openafm.files import cut_log, read_log
from openafm.model import ModelConfig

METRICS = "metrics.jsonl"


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) under the convention above."""
    matmul_params = config.num_params(embeddings=False) + config.vocab_size * config.dim
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * seq_len
    return 6.0 * matmul_params + attention


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16, AMX, or Arm's BF16).

    Without them PyTorch emulates bf16 products, far slower than float32 (an AVX2-only CPU
    measured near zero TFLOP/s), so training and prefill should stay in float32 there.
    """
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return platform.machine() in ("arm64", "aarch64")  # Apple silicon has BF16
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def measure_matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.bfloat16, repeats: int = 5
) -> float:
    """Matrix-multiply FLOP/s of this process in `dtype` (median of `repeats` timed products)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def machine_matmul_peak(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """The peak of all processes together, measured at once (on a CPU they share the cores)."""
    dist.barrier()
    peak = torch.tensor([measure_matmul_peak(device, dtype)], dtype=torch.float64)
    dist.all_reduce(peak)
    return float(peak.item())


class MetricsLog:
    """Appends one JSON object per line to `RUN_DIR/metrics.jsonl` (rank 0 only)."""

    def __init__(self, run_dir: Path, *, enabled: bool) -> None:
        self.path = Path(run_dir) / METRICS
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run repeats the steps after its checkpoint)."""
        if self.enabled:
            cut_log(self.path, lambda r: r.get("step", 0) <= step)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    """The records of a run's metrics file."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS} in {run_dir}: not a training run directory")
    return read_log(path)
