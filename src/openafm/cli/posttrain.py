"""`afm posttrain sft|prompts|rm|rs|rl`: supervised fine-tuning, constraint prompts, the reward
model, rejection sampling from a teacher committee, and RL (MDLOO or RLOO)."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import torch
import typer

from openafm.adapters import LoraAdapter, LoraConfig, load_adapter, save_adapter
from openafm.adapters.adapter_file import check_base
from openafm.adapters.registry import find_adapter, user_adapters_dir
from openafm.cli import adapter as adapter_cli
from openafm.cli.common import (
    command_line,
    err_console,
    load_named,
    print_json,
    progress_bar,
    user_errors,
)
from openafm.eval import ifeval
from openafm.files import sha256_file, write_jsonl_atomic
from openafm.io import openafm_home
from openafm.runtime import Completion, Pretrained, engine_for

app = typer.Typer(
    help="Post-training: SFT, the reward model, rejection sampling with a committee, RL.",
    no_args_is_help=True,
)
app.command("sft", help="Supervised fine-tuning of a LoRA adapter (or with --full every weight) on chat data (loss on the"
            " assistant's tokens only); the same trainer as `afm adapter train`.")(adapter_cli.train)  # fmt: skip
rm_app = typer.Typer(help="Train the reward model, or score answers with it.", no_args_is_help=True)
app.add_typer(rm_app, name="rm")

ModelOption = Annotated[str | None, typer.Option(help="Base model (default: the on-device base).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object at the end.")]


@app.command()
def prompts(
    instructions: Annotated[
        list[Path],
        typer.Option(help="Base instructions: self-instruct JSONL or AlpacaEval JSON (repeat)."),
    ],
    ifeval_data: Annotated[
        Path, typer.Option("--ifeval", help="IFEval prompts to decontaminate against (13-grams).")
    ],
    out_dir: Annotated[
        Path, typer.Option(help="Writes train_prompts.jsonl, heldout_prompts.jsonl.")
    ],
    train: Annotated[int, typer.Option(min=1, help="Training prompts.")] = 1200,
    heldout: Annotated[int, typer.Option(min=1, help="Held-out prompts.")] = 400,
    seed: Annotated[int, typer.Option(help="Seed for the split and the constraints.")] = 0,
    repeat_request: Annotated[
        bool,
        typer.Option(
            help="Also write train_prompts_repeat.jsonl: each training prompt with "
            '"first repeat the request word for word" added.'
        ),
    ] = False,
) -> None:
    """Constraint prompts (IFEval's format) on disjoint base instructions, for RL with a
    verifiable reward and for a held-out evaluation with `afm eval ifeval --data`."""
    from openafm.posttrain.constraint_prompts import (
        prompt_record,
        read_instructions,
        split_prompt_sets,
        with_repeat_request,
    )

    with user_errors():
        bases = [text for path in instructions for text in read_instructions(path)]
        evaluation = [p.prompt for p in ifeval.read_prompts(ifeval_data)]
        train_set, heldout_set = split_prompt_sets(bases, evaluation, train, heldout, seed=seed)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(out_dir / "train_prompts.jsonl", [prompt_record(p) for p in train_set])
        write_jsonl_atomic(
            out_dir / "heldout_prompts.jsonl", [prompt_record(p) for p in heldout_set]
        )
        if repeat_request:
            repeats = [prompt_record(with_repeat_request(p)) for p in train_set]
            write_jsonl_atomic(out_dir / "train_prompts_repeat.jsonl", repeats)
        err_console.print(f"wrote {len(train_set)} training and {len(heldout_set)} held-out prompts to {out_dir}")  # fmt: skip


@rm_app.command("train")
def rm_train(
    data: Annotated[
        Path, typer.Option(help="Preference pairs (JSONL or .jsonl.gz; HH-RLHF or OpenAFM layout).")
    ],
    out: Annotated[Path, typer.Option(help="Reward model directory to write.")],
    plain: Annotated[
        bool, typer.Option(help="Plain Bradley-Terry (p = 1, no grades) instead of soft labels.")
    ] = False,
    default_p: Annotated[
        float, typer.Option(help="p of pairs without a strength level (soft labels).")
    ] = 0.85,
    grade_weight: Annotated[
        float, typer.Option(min=0.0, help="λ: weight of the grading loss.")
    ] = 1.0,
    steps: Annotated[
        int, typer.Option(min=1, help="Optimizer steps (of the heads, or adapter and heads).")
    ] = 300,
    lr: Annotated[float, typer.Option(min=0.0, help="Learning rate (AdamW).")] = 1e-3,
    batch_size: Annotated[int, typer.Option(min=1, help="Pairs per step.")] = 32,
    lora_rank: Annotated[
        int,
        typer.Option(
            min=0,
            help="Also train a LoRA adapter of this rank on the base, end to end (0: the base"
            " stays frozen and its last-token states are cached).",
        ),
    ] = 0,
    holdout: Annotated[
        int, typer.Option(min=0, help="With --lora-rank: hold out the last N pairs for accuracy.")
    ] = 0,
    max_tokens: Annotated[int, typer.Option(min=8, help="Tokens kept per answer (its end).")] = 512,
    max_pairs: Annotated[
        int | None, typer.Option(min=2, help="Use only the first N pairs.")
    ] = None,
    cv: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="K-fold held-out accuracy against plain BT and length (frozen base; default 5,"
            " 0: none).",
        ),
    ] = None,
    model: ModelOption = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(help="Feature cache or checkpoint (default: $OPENAFM_HOME/runs/rm/NAME)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the heads and batches.")] = 0,
    json_output: JsonOption = False,
) -> None:
    """Train the seed's reward model: a reward head and four grading heads on the base's
    last-token state, with the soft-label ranking loss + λ·grading loss. The base stays frozen
    (its states are cached, so k-fold comparisons are cheap), or learns through a LoRA adapter
    (--lora-rank). Rerun to resume after a kill."""
    from openafm.adapters import LoraConfig
    from openafm.posttrain.preferences import read_preferences
    from openafm.posttrain.reward_lora import train_lora_reward_model
    from openafm.posttrain.reward_training import (
        RewardTrainConfig,
        fit_reward_model,
        save_reward_model,
    )

    if lora_rank and cv:
        raise typer.BadParameter(
            "cross-validation needs the frozen base; with --lora-rank use --holdout",
            param_hint="--cv",
        )
    if holdout and not lora_rank:
        raise typer.BadParameter("--holdout is for --lora-rank; the frozen base uses --cv")
    with user_errors():
        pairs = read_preferences(data)[:max_pairs]
        config = RewardTrainConfig(
            soft_labels=not plain,
            default_p=default_p,
            grade_weight=0.0 if plain else grade_weight,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            max_tokens=max_tokens,
            seed=seed,
        )
        pretrained = _load(model)
        signature = pretrained.signature()  # before training casts the base to bf16
        cache = run_dir or openafm_home() / "runs" / "rm" / out.name
        key = hashlib.sha256(f"{sha256_file(data)}|{max_pairs}|{max_tokens}|{signature}".encode()).hexdigest()[:16]  # fmt: skip
        adapter = None
        if lora_rank:
            with progress_bar("reward model steps", config.steps, absolute=True) as reached:
                reward_model, adapter, report = train_lora_reward_model(
                    pretrained.model,
                    pretrained.tokenizer,
                    pairs,
                    config,
                    cache / f"{key}-lora",
                    lora=LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank),
                    holdout=holdout,
                    on_step=lambda step, loss: reached(step),
                )
        else:
            with progress_bar("answer features", 2 * len(pairs)) as advance:
                reward_model, report = fit_reward_model(
                    pretrained.model,
                    pretrained.tokenizer,
                    pairs,
                    config,
                    cache / key,
                    cv_folds=5 if cv is None else cv,
                    on_features=advance,
                )
        meta = {
            "base_signature": signature,
            "base_model": pretrained.path.name,
            "tokenizer": pretrained.tokenizer.fingerprint(),
            "grade_hidden": 256,
            "max_tokens": max_tokens,
            "data": data.name,
            "data_sha256": sha256_file(data),
            "command": command_line(),
            "report": report,
        }
        save_reward_model(reward_model, out, meta, adapter)
        if json_output:
            print_json(report)
            return
        for name, figures in report.get("cross_validation", {}).items():  # type: ignore[union-attr]
            line = f"{name:22} held-out accuracy {100 * figures['accuracy']:.1f}% (fold sd {100 * figures['accuracy_fold_sd']:.1f})"  # fmt: skip
            if "balanced_accuracy" in figures:
                line += f", on length-balanced pairs {100 * figures['balanced_accuracy']:.1f}%"
            print(line)
        if "holdout_accuracy" in report:
            print(f"held-out accuracy {100 * float(report['holdout_accuracy']):.1f}% on {holdout} pairs")  # type: ignore[arg-type]  # fmt: skip
        err_console.print(f"saved the reward model to {out}")


@rm_app.command("score")
def rm_score(
    reward_model: Annotated[Path, typer.Option(help="Reward model directory.")],
    data: Annotated[Path, typer.Option(help="Preference pairs to score (both answers).")],
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N pairs.")] = None,
    model: ModelOption = None,
    json_output: JsonOption = False,
) -> None:
    """Rewards and predicted grades of both answers of each pair, and the pairwise accuracy."""
    from openafm.posttrain.preferences import read_preferences
    from openafm.posttrain.reward_model import GRADES
    from openafm.posttrain.reward_training import load_reward_model, score_answers

    with user_errors():
        pairs = read_preferences(data)[:limit]
        pretrained = _load(model)
        rm = load_reward_model(
            reward_model, pretrained.model, pretrained.signature(), pretrained.tokenizer
        )
        prompts_ = [p.prompt for p in pairs for _ in range(2)]
        answers = [a for p in pairs for a in (p.chosen, p.rejected)]
        rewards, grades = score_answers(rm, pretrained.tokenizer, prompts_, answers)
        rows = [
            {
                "pair": i,
                "chosen_reward": rewards[2 * i],
                "rejected_reward": rewards[2 * i + 1],
                "chosen_grades": dict(zip(GRADES, grades[2 * i], strict=True)),
                "rejected_grades": dict(zip(GRADES, grades[2 * i + 1], strict=True)),
            }
            for i in range(len(pairs))
        ]
        right = sum(r["chosen_reward"] > r["rejected_reward"] for r in rows)
        if json_output:
            print_json({"pairs": rows, "accuracy": right / len(rows)})
            return
        for r in rows:
            print(
                f"{r['pair']:5d}  chosen {r['chosen_reward']:+.3f}  rejected {r['rejected_reward']:+.3f}"
            )
        print(f"accuracy {100 * right / len(rows):.1f}% on {len(rows)} pairs")


def _load(model: str | None) -> Pretrained:
    with err_console.status(f"loading {model or 'the default model'}…", spinner="dots"):
        return load_named(model)


@app.command()
def rs(
    prompts_file: Annotated[
        Path,
        typer.Option(
            "--prompts", help="Constraint prompts (IFEval's format, from `afm posttrain prompts`)."
        ),
    ],
    out_dir: Annotated[
        Path, typer.Option(help="Writes samples.jsonl, report.json, winners.jsonl, pairs.jsonl.")
    ],
    member: Annotated[
        list[str],
        typer.Option(help="Committee member: 'base', an adapter, or LABEL=ADAPTER (repeat)."),
    ] = ["base"],  # noqa: B006
    k: Annotated[int, typer.Option(min=1, help="Samples per member per prompt.")] = 4,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N prompts.")] = None,
    reward_model: Annotated[
        Path | None,
        typer.Option(
            help="Judge with this reward model (default: the verifiable constraint reward,"
            " guarded: under 8 words scores 0 unless length is capped)."
        ),
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="New tokens per sample.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.8,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.95,
    max_batch: Annotated[int, typer.Option(min=1, help="Rows decoded together.")] = 32,
    min_score: Annotated[
        float, typer.Option(help="Keep a winner only if the judge scores it at least this.")
    ] = 1.0,
    repair: Annotated[
        bool,
        typer.Option(
            help="Before judging, replace each answer that misses a constraint by its verified"
            " repair (letter case, quotation marks, last phrase, postscript, no commas) where the"
            " edits make it pass every constraint. Preference pairs keep the answers as sampled."
        ),
    ] = False,
    model: ModelOption = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    json_output: JsonOption = False,
) -> None:
    """Rejection sampling from a teacher committee: K samples per member per prompt (one
    continuous batch), the judge's best per prompt → winners.jsonl (chat SFT data for `afm
    posttrain sft`). Reports the true pass rate of judge-best-of-N against random-of-N and
    oracle-of-N. Rerun to resume sampling after a kill (or to judge stored samples anew)."""
    from openafm.posttrain.committee import (
        Candidate,
        Member,
        best_of_n_report,
        constraint_pairs,
        sample_committee,
        winner_conversations,
    )
    from openafm.posttrain.constraint_prompts import constraint_reward, guarded_reward

    with user_errors():
        asked = ifeval.read_prompts(prompts_file)[:limit]
        members = [Member.parse(m) for m in member]
        pretrained = _load(model)
        for m in members:  # every member must load before any sampling
            if m.adapter is not None:
                check_base(load_adapter(find_adapter(m.adapter)), pretrained.signature())
        judge = None
        if reward_model is not None:
            from openafm.posttrain.reward_training import load_reward_model

            judge = load_reward_model(
                reward_model, pretrained.model, pretrained.signature(), pretrained.tokenizer
            )
        engine = engine_for(pretrained, prefill_dtype=torch.bfloat16)
        out_dir.mkdir(parents=True, exist_ok=True)
        texts = [p.prompt for p in asked]
        with progress_bar(f"sampling ({len(members)} members, k={k})", len(asked)) as advance:
            groups = sample_committee(
                engine,
                texts,
                members,
                k,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                max_batch=max_batch,
                store=out_dir / "samples.jsonl",
                on_prompt=advance,
            )

        def shares(groups: list[list[Candidate]]) -> list[list[float]]:
            return [
                [constraint_reward(p, c.text) for c in g]
                for p, g in zip(asked, groups, strict=True)
            ]

        truth = shares(groups)
        pairs = constraint_pairs(texts, groups, truth)
        repaired = None
        if repair:
            from openafm.posttrain.repair import repair_groups

            groups, repaired = repair_groups(asked, groups)
            truth = shares(groups)
        pairs_of = list(zip(asked, groups, strict=True))
        judged = [[guarded_reward(p, c.text, c.finished) for c in g] for p, g in pairs_of]
        if judge is not None:
            from openafm.posttrain.reward_training import score_answers

            flat = [c for g in groups for c in g]
            scores, _ = score_answers(
                judge,
                pretrained.tokenizer,
                [(("user", texts[c.prompt]),) for c in flat],
                [c.text for c in flat],
            )
            per = len(groups[0]) if groups else 0
            judged = [scores[i * per : (i + 1) * per] for i in range(len(groups))]
        report = best_of_n_report(groups, judged, truth, seed=seed)
        winners = winner_conversations(
            texts, groups, judged, min_score=min_score if judge is None else float("-inf")
        )
        report |= {
            "judge": str(reward_model) if reward_model else "guarded verifiable constraint reward",
            "members": [asdict(m) for m in members],
            "k": k,
            "winners": len(winners),
            "repaired_answers": repaired,
            "command": command_line(),
        }
        write_jsonl_atomic(out_dir / "winners.jsonl", [{"messages": w} for w in winners])
        write_jsonl_atomic(out_dir / "pairs.jsonl", pairs)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if json_output:
            print_json(report)
            return
        print(
            f"fully passing: judge's best-of-{k * len(members)} {100 * report['judge_best_pass_rate']:.1f}%,"  # type: ignore[operator]
            f" random {100 * report['random_pass_rate']:.1f}%, oracle {100 * report['oracle_best_pass_rate']:.1f}%"  # type: ignore[operator]
        )
        err_console.print(f"{len(winners)} winners in {out_dir / 'winners.jsonl'}; train on them with `afm posttrain sft --data …`")  # fmt: skip


@app.command()
def rl(
    prompts_file: Annotated[
        Path, typer.Option("--prompts", help="Constraint prompts (IFEval's format).")
    ],
    name: Annotated[str, typer.Option(help="Name of the policy adapter to write.")],
    algo: Annotated[
        str, typer.Option(help="mdloo (mirror descent, KL trust region) or rloo (PPO clip).")
    ] = "mdloo",
    iterations: Annotated[int, typer.Option(min=1, help="Rollout batches.")] = 20,
    prompts_per_iteration: Annotated[
        int, typer.Option(min=1, help="Prompts per rollout batch.")
    ] = 8,
    k: Annotated[int, typer.Option(help="Responses per prompt (≥ 2).")] = 4,
    updates: Annotated[int, typer.Option(min=1, help="μ: gradient steps per rollout batch.")] = 2,
    beta: Annotated[
        float, typer.Option(min=0.0, help="KL-to-reference weight in the reward.")
    ] = 0.05,
    step_size: Annotated[
        float, typer.Option(min=0.0, help="MDPO's t (the KL to the rollout policy weighs 1/t).")
    ] = 1.0,
    clip: Annotated[float, typer.Option(min=0.0, help="RLOO's ratio clip.")] = 0.2,
    lr: Annotated[float, typer.Option(min=0.0, help="Learning rate (Adam).")] = 2e-4,
    max_tokens: Annotated[int, typer.Option(min=1, help="New tokens per response.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0)] = 1.0,
    init_from: Annotated[
        str | None,
        typer.Option(help="Start (and reference) adapter; default: a fresh rank-16 LoRA."),
    ] = None,
    model: ModelOption = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(help="Checkpoints and metrics (default: $OPENAFM_HOME/runs/rl/NAME)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Adapter directory (default: $OPENAFM_HOME/adapters/NAME).")
    ] = None,
    restart: Annotated[bool, typer.Option(help="Discard the run directory's checkpoint.")] = False,
    seed: Annotated[
        int, typer.Option(help="Seed of the prompt order, the samples and a fresh adapter.")
    ] = 0,
    json_output: JsonOption = False,
) -> None:
    """RL on a LoRA policy with the verifiable constraint reward (guarded: a length floor, a
    penalty for no end): K responses per prompt, leave-one-out advantages, μ updates per batch
    with MDLOO or RLOO. Logs reward, KL to reference and old policy, length and empty rate per
    iteration (`afm train plot RUN_DIR`); rerun the same command to resume, or with more
    --iterations to extend the run."""
    from openafm.posttrain.constraint_prompts import guarded_reward
    from openafm.posttrain.rl import PolicyTrainer, RLConfig
    from openafm.posttrain.rl_run import RLRun, run_rl

    with user_errors():
        config = RLConfig(
            algo=algo, k=k, updates=updates, beta=beta, step_size=step_size, clip=clip, lr=lr,
            max_tokens=max_tokens, temperature=temperature, bf16=True,
        )  # fmt: skip
        asked = ifeval.read_prompts(prompts_file)
        pretrained = _load(model)
        signature = pretrained.signature()
        if init_from is not None:
            start = load_adapter(find_adapter(init_from))
            check_base(start, signature)
            policy = start.to(torch.float32)
            policy.name = name
            for p in policy.parameters():
                p.requires_grad_(True)
        else:
            policy = LoraAdapter.fresh(name, pretrained.model, LoraConfig(rank=16), seed=seed)
        run = RLRun(
            run_dir or openafm_home() / "runs" / "rl" / name,
            iterations,
            prompts_per_iteration,
            seed,
        )
        if restart and run.run_dir.exists():
            shutil.rmtree(run.run_dir)
        ids = [
            pretrained.tokenizer.encode_chat([{"role": "user", "content": p.prompt}]) for p in asked
        ]

        def reward(key: int, completion: Completion) -> float:
            return guarded_reward(asked[key], completion.text, completion.finish_reason == "stop")

        settings = {
            "config": asdict(config), "run": [prompts_per_iteration, seed],
            "prompts": sha256_file(prompts_file), "init_from": init_from, "base": signature,
        }  # fmt: skip
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        trainer = PolicyTrainer(
            pretrained.model, pretrained.tokenizer, policy, reward, config, seed=seed
        )
        with progress_bar(f"RL ({algo})", iterations, absolute=True) as reached:

            def on_iteration(stats: dict[str, float]) -> None:
                reached(int(stats["iteration"]))
                err_console.log(
                    f"iteration {int(stats['iteration'])}: reward {stats['reward']:.3f},"
                    f" KL(ref) {stats['kl_to_reference']:.3f}, KL(old) {stats['kl_to_old']:.4f},"
                    f" length {stats['length']:.0f}"
                    + (
                        f"; skipped {stats['skipped_updates']:.0f} updates whose ratio overflowed"
                        if stats.get("skipped_updates")
                        else ""
                    )
                )

            history = run_rl(trainer, ids, run, settings_key=key, on_iteration=on_iteration)
        policy.metadata = {
            "base_signature": signature,
            "training": {"kind": f"rl-{algo}", "command": command_line(), **settings, "final": history[-1] if history else None},
        }  # fmt: skip
        target = out or user_adapters_dir() / name
        save_adapter(policy, target)
        summary = {
            "adapter": str(target),
            "iterations": len(history),
            "last": history[-1] if history else None,
        }
        if json_output:
            print_json(summary)
        else:
            err_console.print(f"saved the policy adapter to {target}")
