"""Pre-training throughput on one GPU: a ~1B model of the seed's architecture for 50 steps.

Prints one JSON object: tokens/s (median over the steps after the first), MFU against the bf16
matrix-multiply peak measured in the same run (`openafm.train.metrics` states the FLOP
convention), the loss curve's ends and peak memory. The data are the UTF-8 bytes of the
repository's text fixtures as token ids (real text, no tokenizer needed on the GPU machine);
nothing is written but a temporary token shard. Runs on the CPU too (`--config tiny`), which is
how it is checked without a GPU.

    bash benchmarks/gpu_train.sh                      # afm-1b, 50 steps, 8 x 2048 tokens/step
    bash benchmarks/gpu_train.sh --config tiny --steps 5 --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from openafm.files import sha256_file, write_json_atomic
from openafm.train.config import load_train_config
from openafm.train.trainer import train

ROOT = Path(__file__).resolve().parent.parent
OUT_OF_MEMORY = 3


def byte_shard(folder: Path) -> Path:
    """A token-shard folder whose ids are the bytes of the repository's text fixtures."""
    texts = sorted((ROOT / "tests" / "fixtures").rglob("*.txt")) + sorted(ROOT.glob("*.md"))
    tokens = np.frombuffer(b"\n\n".join(p.read_bytes() for p in texts), dtype=np.uint8)
    tokens = tokens.astype(np.uint16)
    tokens.tofile(folder / "shard-00000.bin")
    shard = {"file": "shard-00000.bin", "tokens": int(tokens.size), "documents": len(texts)}
    shard["sha256"] = sha256_file(folder / "shard-00000.bin")
    manifest = {"format": "openafm-token-shards/1", "dtype": "uint16", "shards": [shard]}
    write_json_atomic(folder / "manifest.json", manifest)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="afm-1b", help="training preset or config file")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, help="sequences per step")
    parser.add_argument("--micro-batch", type=int, help="sequences per forward")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    config = load_train_config(args.config).replace(
        steps=args.steps,
        batch_size=args.batch_size,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        activation_checkpointing=args.activation_checkpointing,
        warmup_steps=min(10, args.steps),
        val_fraction=0.0,
    )
    records: list[dict] = []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = byte_shard(Path(tmp))
        try:
            summary = train(
                config,
                [data],
                Path(tmp) / "run",
                device=args.device,
                on_step=records.append,
                save=False,
            )
        except torch.cuda.OutOfMemoryError as exc:
            print(json.dumps({"error": f"out of GPU memory: {exc}"}), flush=True)
            return OUT_OF_MEMORY
    speeds = [r["tokens_per_s"] for r in records[1:]] or [records[0]["tokens_per_s"]]
    speed = statistics.median(speeds)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    result = {
        "benchmark": "gpu_train",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "config": config.to_dict(),
        "parameters": summary.parameters,
        "tokens_per_step": config.batch_size * config.seq_len,
        "steps": len(records),
        "tokens_per_s_median": speed,
        "step_time_median_s": statistics.median(r["step_time"] for r in records[1:] or records),
        "matmul_peak_tflops": summary.peak_flops / 1e12,
        "mfu_median": statistics.median(r["mfu"] for r in records[1:] or records),
        "loss_first": records[0]["loss"],
        "loss_last": records[-1]["loss"],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "wall_s": time.perf_counter() - began,
    }
    print(json.dumps(result, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
