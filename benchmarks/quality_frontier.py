"""Quality against bits per weight: compressed models and simple baselines vs the float base.

For each compressed model directory (with and without its recovery adapter) and for affine
round-to-nearest baselines (every projection quantized in blocks, 8-bit embedding, computed on
the fly), score against the float32 base on held-out text: perplexity ratio, mean and 99th
percentile KLD, same-top-1 rate; the base is the baseline of every row, in the same run.
Writes JSON, a Markdown table and a PNG of mean KLD (log scale) against bits per weight.

    python benchmarks/quality_frontier.py --model mixed-4.0=DIR [--model ...] \
        --data tinyshakespeare.txt --data pg1342.txt --out docs/compression_frontier
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from openafm.adapters import detach
from openafm.compress.affine import affine_bits_per_weight, affine_round_to_nearest
from openafm.compress.calibration import projection_names, text_windows
from openafm.eval.quality import compare_models, reference_log_probs
from openafm.io.compressed_checkpoint import bits_summary, quantize_embedding
from openafm.runtime import load_pretrained

# llama.cpp's requantizations of the same base (bits per weight over the whole file), from
# ../shared/reference/ANCHORS.md, measured by the peers on 8 windows of 512 tokens of
# encyclopedic text: (bpw, ppl ratio, mean KLD).
LLAMA_CPP = {
    "llama.cpp Q4_K_M": (6.17, 1.042, 0.049),
    "llama.cpp Q3_K_M": (5.46, 1.087, 0.130),
    "llama.cpp IQ4_NL": (5.37, 1.179, 0.177),
    "llama.cpp Q3_K_S": (5.14, 1.257, 0.402),
}
AFFINE = [(4, 192), (3, 32), (3, 64), (2, 32)]


def affine_model(base, bits: int, block: int):
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in projection_names(model):
            weight = modules[name].weight
            weight.copy_(affine_round_to_nearest(weight, bits, block))
    quantize_embedding(model)
    return model.eval()


def score(model, references, windows_by_text):
    return {
        text: compare_models(model, references[text], windows).as_dict()
        for text, windows in windows_by_text.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="LABEL=DIR")
    parser.add_argument("--data", action="append", type=Path, required=True)
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--no-affine", action="store_true")
    parser.add_argument(
        "--no-plain", action="store_true", help="score models with a recovery adapter only with it"
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="replace rows of the same label in OUT.json, keep the rest",
    )
    parser.add_argument("--out", type=Path, required=True, help="path prefix for .json/.md/.png")
    args = parser.parse_args()

    base = load_pretrained(args.base)
    windows = {
        path.name: text_windows(base.tokenizer, path, window=args.window, max_tokens=args.tokens)
        for path in args.data
    }
    references = {text: reference_log_probs(base.model, w) for text, w in windows.items()}
    results = []
    for spec in args.model:
        label, _, directory = spec.partition("=")
        compressed = load_pretrained(directory)
        summary = bits_summary(compressed.model)
        variants = [("", False)]
        if compressed.default_adapter:
            variants = [("+ recovery", True)] + ([] if args.no_plain else variants)
        for suffix, keep in variants:
            if not keep:
                detach(compressed.model)
            results.append(
                {
                    "label": f"{label} {suffix}".strip(),
                    "kind": "palettized",
                    "recovery": keep,
                    "bpw": summary["bpw"],
                    "bpw_total": summary["bpw_total"],
                    "texts": score(compressed.model, references, windows),
                }
            )
            print(json.dumps(results[-1]), flush=True)
    if not args.no_affine:
        for bits, block in AFFINE:
            model = affine_model(base.model, bits, block)
            results.append(
                {
                    "label": f"affine RTN {bits}-bit, blocks of {block}",
                    "kind": "affine",
                    "recovery": False,
                    "bpw": affine_bits_per_weight(bits, block),
                    "bpw_total": None,  # simulated: the weights are held dense
                    "texts": score(model, references, windows),
                }
            )
            print(json.dumps(results[-1]), flush=True)
            del model
    for row in results:
        texts = row["texts"].values()
        for key in ("ppl_ratio", "kld_mean", "kld_p99", "top1_agreement"):
            row[key] = sum(t[key] for t in texts) / len(row["texts"])
    json_path = args.out.with_suffix(".json")
    if args.update and json_path.is_file():
        fresh = {row["label"]: row for row in results}
        kept = json.loads(json_path.read_text())
        results = [fresh.pop(row["label"], row) for row in kept] + list(fresh.values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    write_table(results, args, args.out.with_suffix(".md"))
    plot(results, args.out.with_suffix(".png"))


def write_table(results, args, path: Path) -> None:
    texts = [p.name for p in args.data]
    lines = [
        f"Scored against the float32 base on the first {args.tokens} tokens of each text in"
        f" windows of {args.window} (second halves scored); columns average the texts"
        f" ({', '.join(texts)}). `bpw`: block projections, tables and scales included;"
        " `bpw_total`: every weight, 8-bit embedding included.",
        "",
        "| model | bpw | bpw_total | ppl ratio | mean KLD | p99 KLD | same top-1 |"
        + "".join(f" KLD {t} |" for t in texts),
        "|---|---|---|---|---|---|---|" + "---|" * len(texts),
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['bpw']:.3f} |"
            f" {'—' if r['bpw_total'] is None else format(r['bpw_total'], '.3f')} | {r['ppl_ratio']:.3f} |"
            f" {r['kld_mean']:.3f} | {r['kld_p99']:.3f} | {100 * r['top1_agreement']:.1f}% |"
            + "".join(f" {r['texts'][t]['kld_mean']:.3f} |" for t in texts)
        )
    for label, (bpw, ratio, kld) in LLAMA_CPP.items():
        lines.append(
            f"| {label} (ANCHORS.md, other text) | {bpw} (file) | | {ratio} | {kld} | | |"
            + " |" * len(texts)
        )
    path.write_text("\n".join(lines) + "\n")


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {
        ("palettized", True): ("o", "tab:green", "palettized + recovery adapter"),
        ("palettized", False): ("s", "tab:blue", "palettized"),
        ("affine", False): ("^", "tab:gray", "affine round-to-nearest"),
    }
    shown = set()
    for r in results:
        marker, color, name = styles[(r["kind"], r["recovery"])]
        ax.scatter(r["bpw"], r["kld_mean"], marker=marker, color=color,
                   label=None if name in shown else name)  # fmt: skip
        shown.add(name)
        ax.annotate(r["label"], (r["bpw"], r["kld_mean"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")  # fmt: skip
    for label, (bpw, _, kld) in LLAMA_CPP.items():
        ax.scatter(bpw, kld, marker="x", color="tab:red",
                   label=None if "llama" in shown else "llama.cpp (whole-file bpw)")  # fmt: skip
        shown.add("llama")
        ax.annotate(label.removeprefix("llama.cpp "), (bpw, kld), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (block projections; llama.cpp: whole file)")
    ax.set_ylabel("mean per-token KL divergence from the float base")
    ax.set_title("SmolLM2-135M-Instruct: quality vs bits per weight")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    main()
