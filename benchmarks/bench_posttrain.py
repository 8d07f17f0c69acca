"""Post-training throughput on the default base, as JSON: ratios measured side by side.

- rollout: answer tokens/s of RL rollouts (4 prompts, K=4, through one continuous batch) as a
  ratio to plain batch-1 decode;
- rl_update: tokens/s of one MDLOO update (μ = 2 passes over the rollout, against the rollout
  policy's token log-probabilities kept from the rollout pass), RLOO's, and the reward model's
  feature pass, as ratios to a LoRA SFT step (batch 8, bf16 autocast);
each the median of `--repeats`, with 1 and 2 threads fixed and as the RL trainer runs by default
(all cores; rollout decode steps pick 1 or all by timing), quiet and (unless --quiet-only) beside
a CPU-bound process; `tuned_vs_fixed` gives the default's rates as ratios to each fixed count in
the same condition.

    python benchmarks/bench_posttrain.py [--repeats 3] [--out docs/bench_posttrain.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import cpu

PROMPTS = [
    "Write a haiku about the sea. Your entire response should be in lowercase letters.",
    "Explain how a bicycle gear works. Answer with at least 50 words.",
    "List three uses of copper. Do not use any commas in your response.",
    "Describe a sunrise. Wrap your entire response in double quotation marks.",
]
NEW_TOKENS = 64
TUNED_FIGURES = ("rollout_tokens_per_s", "mdloo_update_tokens_per_s", "rloo_update_tokens_per_s")


def _median_rate(fn, repeats: int) -> float:
    """Median of work/seconds over `repeats` calls of fn() -> work."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        work = fn()
        rates.append(work / (time.perf_counter() - start))
    return statistics.median(rates)


def measure(threads: int, repeats: int, tune: bool) -> dict[str, float]:
    from openafm.adapters import LoraAdapter, LoraConfig
    from openafm.adapters.sft_data import collate, tokenize_all
    from openafm.adapters.trainer import answer_loss
    from openafm.posttrain.reward_training import last_hidden_states
    from openafm.posttrain.rl import PolicyTrainer, RLConfig
    from openafm.runtime import Engine, SamplingParams, load_pretrained
    from openafm.runtime.batches import generate_continuously

    torch.set_num_threads(threads)
    pretrained = load_pretrained(None)
    model, tokenizer = pretrained.model, pretrained.tokenizer
    ids = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    fixed = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=0, ignore_eos=True)
    engine = Engine(model, tokenizer, tune_threads=tune)

    def decode_one() -> int:
        return len(engine.generate([ids[0]], fixed)[0].token_ids)

    def rollout() -> int:
        requests = [(p, fixed, None) for p in ids for _ in range(4)]
        return sum(len(c.token_ids) for c in generate_continuously(engine, requests, max_batch=16))

    adapter = LoraAdapter.fresh("policy", model, LoraConfig(rank=16), seed=0)
    conversations = [
        [{"role": "user", "content": p}, {"role": "assistant", "content": p * 3}] for p in PROMPTS
    ] * 2
    examples, _ = tokenize_all(tokenizer, conversations, 512)
    tokens, labels = collate(examples, tokenizer.eos_id or 0)
    adapter.attach(model)

    def sft_step() -> int:
        model.zero_grad()
        loss, _ = answer_loss(model, tokens, labels, bf16=True)
        loss.backward()
        return tokens.numel()

    def reward(_: int, completion) -> float:
        return len(completion.token_ids) / NEW_TOKENS

    figures = {
        "decode_batch1_tokens_per_s": _median_rate(decode_one, repeats),
        "rollout_tokens_per_s": _median_rate(rollout, repeats),
        "sft_step_tokens_per_s": _median_rate(sft_step, repeats),
    }
    for algo in ("mdloo", "rloo"):
        # a fresh policy per algorithm, and a small lr: repeated updates on one batch are timed,
        # and must not drive the policy away from what the next rollout samples from
        policy = LoraAdapter.fresh("policy", model, LoraConfig(rank=16), seed=0)
        config = RLConfig(
            algo=algo, k=4, max_tokens=NEW_TOKENS, bf16=True, temperature=1.0, lr=1e-5
        )
        trainer = PolicyTrainer(model, tokenizer, policy, reward, config, tune_threads=tune)
        batch = trainer.rollout(ids)

        def update(trainer=trainer, batch=batch) -> int:
            trainer.update(batch)
            return batch.inputs.numel() * trainer.config.updates

        figures[f"{algo}_update_tokens_per_s"] = _median_rate(update, repeats)
    sequences = [row.tolist() for row in tokens]
    figures["rm_features_tokens_per_s"] = _median_rate(
        lambda: last_hidden_states(model, sequences).shape[0] * tokens.shape[1], repeats
    )
    ratios = {
        "rollout_vs_decode_batch1": figures["rollout_tokens_per_s"]
        / figures["decode_batch1_tokens_per_s"],
        **{
            f"{name}_vs_sft_step": figures[f"{name}_tokens_per_s"]
            / figures["sft_step_tokens_per_s"]
            for name in ("mdloo_update", "rloo_update", "rm_features")
        },
    }
    return {k: round(v, 3) for k, v in {**figures, **ratios}.items()}


def spawn(threads: int, repeats: int, tune: bool) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", str(threads), "--repeats", str(repeats)]
    proc = subprocess.run(
        [*cmd, *(["--tune"] if tune else [])], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"worker with {threads} threads failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quiet-only", action="store_true", help="skip the busy-neighbour runs")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tune", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.repeats, args.tune)))
        return
    results: dict[str, object] = {"machine": cpu(), "new_tokens": NEW_TOKENS}
    results["repeats"] = args.repeats
    cores = os.cpu_count() or 1
    settings = {"threads 1": (1, False), "threads 2": (2, False), "tuned": (cores, True)}
    for condition in ("quiet", "busy")[: 1 if args.quiet_only else 2]:
        burner = None
        if condition == "busy":
            burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            for name, (threads, tune) in settings.items():
                results[f"{name} {condition}"] = spawn(threads, args.repeats, tune)
        finally:
            if burner is not None:
                burner.kill()
                burner.wait()
        results[f"tuned_vs_fixed {condition}"] = {
            f"{figure}_vs_{fixed}": round(
                results[f"tuned {condition}"][figure] / results[f"{fixed} {condition}"][figure], 3
            )
            for fixed in ("threads 1", "threads 2")
            for figure in TUNED_FIGURES
        }
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
