"""What IFEval's token cap costs a model: re-run a seeded sample of the answers that reached the
cap with the reference harness's budget (1,280 new tokens), and estimate the uncapped scores.

Greedy answers that stopped before the cap are the same under any larger budget, so only the
cut ones can change; their pass rate at 1,280 tokens is estimated from the sample (bootstrap
interval over the sampled prompts). Prints JSON with the CPU's flags.

    python benchmarks/ifeval_cap_effect.py docs/eval/cache/ifeval-KEY.jsonl \
        --data ../shared/data/ifeval/input_data.jsonl [--sample 48] [--model M] [--adapter A]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_decode import cpu  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path, help="a report's IFEval rows (cache/ifeval-*.jsonl)")
    parser.add_argument("--data", type=Path, required=True, help="the IFEval prompts")
    parser.add_argument("--sample", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=1280)
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from openafm.cli.eval_suites import load_engine
    from openafm.eval import ifeval
    from openafm.runtime.batches import greedy_chat_responses

    rows = [json.loads(line) for line in args.rows.read_text().splitlines()]
    if "cut_at_cap" not in rows[0]:
        raise SystemExit("these rows do not say which answers the cap cut (an older run)")
    cut = [r for r in rows if r["cut_at_cap"]]
    sample = random.Random(args.seed).sample(cut, min(args.sample, len(cut)))
    prompts = {p.key: p for p in ifeval.read_prompts(args.data)}
    asked = [prompts[r["key"]] for r in sample]

    engine, _ = load_engine(args.model)
    start = time.perf_counter()
    done, _ = greedy_chat_responses(
        engine, [p.prompt for p in asked], max_tokens=args.max_tokens, adapter=args.adapter
    )
    seconds = time.perf_counter() - start
    verdicts = [ifeval.score(p, c.text) for p, c in zip(asked, done, strict=True)]

    out: dict[str, object] = {
        "benchmark": "ifeval_cap_effect",
        "rows": str(args.rows),
        "cut_at_cap": len(cut),
        "sampled": len(sample),
        "max_tokens": args.max_tokens,
        "still_cut_at_new_cap": sum(c.finish_reason == "length" for c in done),
        "seconds": round(seconds, 1),
        "cpu": cpu(),
    }
    for mode in ("strict", "loose"):
        out |= _uncapped(mode, rows, sample, [getattr(v, mode) for v in verdicts], args.seed)
    print(json.dumps(out, indent=2))


def _uncapped(
    mode: str, rows: list[dict], sample: list[dict], new: list[tuple[bool, ...]], seed: int
) -> dict[str, object]:
    """Uncapped prompt- and instruction-level estimates: the answers the cap did not cut as
    they are, the cut ones at the sample's new pass rate (bootstrap over sampled prompts)."""
    kept = [r for r in rows if not r["cut_at_cap"]]
    cut = [r for r in rows if r["cut_at_cap"]]
    n_instructions = sum(len(r["instruction_id_list"]) for r in rows)
    cut_instructions = sum(len(r["instruction_id_list"]) for r in cut)
    kept_prompts = sum(all(r[mode]) for r in kept)
    kept_instructions = sum(sum(r[mode]) for r in kept)
    prompt_pass = np.array([all(f) for f in new], dtype=float)
    instr_pass = np.array([sum(f) for f in new], dtype=float)
    instr_count = np.array([len(f) for f in new], dtype=float)

    def estimate(idx: np.ndarray) -> tuple[float, float]:
        prompt = (kept_prompts + prompt_pass[idx].mean() * len(cut)) / len(rows)
        rate = instr_pass[idx].sum() / instr_count[idx].sum()
        return prompt, (kept_instructions + rate * cut_instructions) / n_instructions

    rng = np.random.default_rng(seed)
    point = estimate(np.arange(len(new)))
    boots = np.array([estimate(rng.integers(0, len(new), len(new))) for _ in range(2000)])
    low, high = np.percentile(boots, [2.5, 97.5], axis=0)
    return {
        f"prompt_level_{mode}_uncapped": round(float(point[0]), 4),
        f"prompt_level_{mode}_uncapped_ci": [round(float(low[0]), 4), round(float(high[0]), 4)],
        f"instruction_level_{mode}_uncapped": round(float(point[1]), 4),
        f"instruction_level_{mode}_uncapped_ci": [
            round(float(low[1]), 4),
            round(float(high[1]), 4),
        ],
        f"average_{mode}_uncapped": round(float(sum(point) / 2), 4),
        f"sample_passing_{mode}_at_cap": sum(all(r[mode]) for r in sample),
        f"sample_passing_{mode}_uncapped": int(prompt_pass.sum()),
    }


if __name__ == "__main__":
    main()
