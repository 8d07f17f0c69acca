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

from openafm.adapters import detach, load_adapter
from openafm.cli.common import load_named
from openafm.compress.affine import affine_bits_per_weight, affine_round_to_nearest
from openafm.compress.calibration import projection_names, text_windows
from openafm.compress.default_model import PALETTIZED_DEFAULT
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
    parser.add_argument(
        "--replot",
        action="store_true",
        help="only recompute whole-model bits, the table and the plot from OUT.json",
    )
    parser.add_argument("--out", type=Path, required=True, help="path prefix for .json/.md/.png")
    args = parser.parse_args()

    base = load_pretrained(args.base)
    whole = WholeModelBits(base.model)
    if args.replot:
        results = json.loads(args.out.with_suffix(".json").read_text())
        adapter = load_named(PALETTIZED_DEFAULT).default_adapter  # every recovery: rank 16
        for row in results:
            row["bpw_whole"] = whole(row["bpw"], adapter if row["recovery"] else None)
        write_outputs(results, args)
        return
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
                    "bpw_whole": whole(
                        summary["bpw"], compressed.default_adapter if keep else None
                    ),
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
                    "bpw_whole": whole(affine_bits_per_weight(bits, block), None),
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
    write_outputs(results, args)


def write_outputs(results: list[dict], args: argparse.Namespace) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    write_table(results, args, args.out.with_suffix(".md"))
    plot(results, args.out.with_suffix(".png"))


class WholeModelBits:
    """Bits per weight of the whole model, as llama.cpp counts a file: the projections at
    `bpw`, the 8-bit embedding and the norms as the compressed models store them, and the
    recovery adapter (when used), over every weight of the base."""

    def __init__(self, base) -> None:
        model = copy.deepcopy(base)
        quantize_embedding(model)
        summary = bits_summary(model)  # projections dense here: their bits are taken out
        self.projections = summary["projection_weights"]
        self.weights = summary["total_weights"]
        self.rest_bits = summary["bytes"] * 8 - summary["bpw"] * self.projections

    def __call__(self, bpw: float, adapter: Path | None) -> float:
        adapter_bits = 0
        if adapter is not None:
            adapter_bits = sum(
                t.numel() * t.element_size() * 8
                for pair in load_adapter(adapter).pairs.values()
                for t in pair
            )
        return (bpw * self.projections + self.rest_bits + adapter_bits) / self.weights


def write_table(results, args, path: Path) -> None:
    texts = [p.name for p in args.data]
    lines = [
        f"Scored against the float32 base on the first {args.tokens} tokens of each text in"
        f" windows of {args.window} (second halves scored); columns average the texts"
        f" ({', '.join(texts)}). `bpw`: block projections, tables and scales included;"
        " `bpw_total`: every weight, 8-bit embedding included; `whole`: as llama.cpp counts a"
        " file, `bpw_total` plus the recovery adapter (bf16, rank 16) when the row uses it.",
        "",
        "| model | bpw | bpw_total | whole | ppl ratio | mean KLD | p99 KLD | same top-1 |"
        + "".join(f" KLD {t} |" for t in texts),
        "|---|---|---|---|---|---|---|---|" + "---|" * len(texts),
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['bpw']:.3f} |"
            f" {'—' if r['bpw_total'] is None else format(r['bpw_total'], '.3f')} |"
            f" {r['bpw_whole']:.3f} | {r['ppl_ratio']:.3f} |"
            f" {r['kld_mean']:.3f} | {r['kld_p99']:.3f} | {100 * r['top1_agreement']:.1f}% |"
            + "".join(f" {r['texts'][t]['kld_mean']:.3f} |" for t in texts)
        )
    for label, (bpw, ratio, kld) in LLAMA_CPP.items():
        lines.append(
            f"| {label} (ANCHORS.md, other text) | | | {bpw} | {ratio} | {kld} | | |"
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
        ax.scatter(r["bpw_whole"], r["kld_mean"], marker=marker, color=color,
                   label=None if name in shown else name)  # fmt: skip
        shown.add(name)
        ax.annotate(r["label"], (r["bpw_whole"], r["kld_mean"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")  # fmt: skip
    for label, (bpw, _, kld) in LLAMA_CPP.items():
        ax.scatter(bpw, kld, marker="x", color="tab:red",
                   label=None if "llama" in shown else "llama.cpp")  # fmt: skip
        shown.add("llama")
        ax.annotate(label.removeprefix("llama.cpp "), (bpw, kld), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight, whole model (embedding and recovery adapter included)")
    ax.set_ylabel("mean per-token KL divergence from the float base")
    ax.set_title("SmolLM2-135M-Instruct: quality vs bits per weight")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    main()
