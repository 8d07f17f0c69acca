"""Throughput of the evaluation suites: examples/s of each suite's generation and scoring, with
batches of 8 prompts against one prompt at a time in the same run (the ratio is what batching
buys), on the default model. Prints JSON with the CPU's flags.

    python benchmarks/bench_eval.py [--examples 16] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_decode import cpu  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=16, help="examples per suite")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--ifeval-max-tokens", type=int, default=256)
    args = parser.parse_args()

    import torch

    from openafm.cli.eval_suites import load_engine
    from openafm.eval.report import SuiteData, Variant, run_suite

    torch.set_num_threads(2)
    engine, _ = load_engine(args.model)
    suites = {
        "ifeval": {"ifeval": FIXTURES / "ifeval" / "input_data.jsonl"},
        "xstest": {"xstest": FIXTURES / "safety" / "xstest_prompts.csv"},
        "aeslc": {"aeslc": FIXTURES / "summaries" / "aeslc_test_head4.jsonl"},
        "dialogsum": {"dialogsum": FIXTURES / "summaries" / "dialogsum_test_head3.jsonl"},
    }
    results = {}
    for suite, files in suites.items():
        row = {}
        for batch in (8, 1):
            data = SuiteData(
                **files,
                limit=args.examples,
                ifeval_max_tokens=args.ifeval_max_tokens,
                safety_max_tokens=128,
                batch_size=batch,
            )
            start = time.perf_counter()
            result = run_suite(suite, engine, Variant(args.model), data, lambda n: None)
            row[f"batch_{batch}_examples_per_s"] = len(result.rows) / (time.perf_counter() - start)
        row["batch_8_vs_1"] = row["batch_8_examples_per_s"] / row["batch_1_examples_per_s"]
        results[suite] = row
        print(f"  {suite}: {row}", file=sys.stderr)
    print(json.dumps({"machine": cpu(), "model": args.model, "suites": results}, indent=2))


if __name__ == "__main__":
    main()
