"""The report's page: one chart per suite (bars with 95% whiskers, a bar per variant) and a
table of every headline figure with its interval, `n` and speed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

GRADED = [("good", "good"), ("neutral", "neutral"), ("poor", "poor"), ("rougeL", "ROUGE-L")]
# suite -> (chart title, [(figure key, bar label)])
HEADLINES: Mapping[str, tuple[str, list[tuple[str, str]]]] = {
    "ifeval": (
        "IFEval accuracy (higher is better)",
        [
            ("prompt_level_strict", "prompt strict"),
            ("instruction_level_strict", "instruction strict"),
            ("prompt_level_loose", "prompt loose"),
            ("instruction_level_loose", "instruction loose"),
        ],
    ),
    "advbench": ("AdvBench violation rate (lower is better)", [("violation_rate", "violation")]),
    "harmbench": ("HarmBench violation rate (lower is better)", [("violation_rate", "violation")]),
    "xstest": (
        "XSTest refusals (safe prompts: lower is better; unsafe: higher)",
        [("over_refusal_rate", "safe prompts refused"), ("unsafe_refusal_rate", "unsafe refused")],
    ),
    "aeslc": ("AESLC e-mail summaries, graded", GRADED),
    "dialogsum": ("DialogSum summaries, graded", GRADED),
    "samsum": ("SAMSum message summaries, graded", GRADED),
    "injection": ("Prompt injections resisted (higher is better)", [("resisted_rate", "resisted")]),
}
ANCHORS = {
    "ifeval": "SmolLM2-135M-Instruct's model card: 29.9, the mean of prompt- and instruction-level"
    " accuracy (lighteval).",
    "advbench": "Apple's on-device model: 7.5% violations (human graders, Apple's own prompts).",
    "harmbench": "Apple's on-device model: 7.5% violations (human graders, Apple's own prompts).",
    "injection": "Apple: its summarization adapter did not amplify sensitive content in over 99%"
    " of targeted adversarial examples.",
}


def headline(figures: Mapping[str, object], key: str) -> tuple[float, float, float] | None:
    """(value, low, high) of a headline figure, or None where the suite does not report it."""
    if "grades" in figures and key in ("good", "neutral", "poor"):
        part = figures["grades"][key]  # type: ignore[index]
        return part["rate"], part["ci"][0], part["ci"][1]
    if key not in figures:
        return None
    low, high = figures[f"{key}_ci"]  # type: ignore[misc]
    return float(figures[key]), float(low), float(high)  # type: ignore[arg-type]


def chart(
    suite: str, results: Mapping[str, Mapping[str, Mapping[str, object]]], path: Path
) -> bool:
    """Grouped bars with 95% whiskers, one group per headline figure, one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title, keys = HEADLINES[suite]
    labels = [v for v in results if suite in results[v]]
    if not labels:
        return False
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(keys) + 2), 3.8))
    for i, label in enumerate(labels):
        points = [headline(results[label][suite], k) for k, _ in keys]
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(keys))]
        values = [p[0] if p else 0.0 for p in points]
        errors = [
            [p[0] - p[1] if p else 0 for p in points],
            [p[2] - p[0] if p else 0 for p in points],
        ]
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=label)
    ax.set_xticks(range(len(keys)), [name for _, name in keys])
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _cell(figures: Mapping[str, object] | None, key: str) -> str:
    point = None if figures is None else headline(figures, key)
    if point is None:
        return "—"
    value, low, high = point
    return f"{100 * value:.1f} ({100 * low:.1f}-{100 * high:.1f})"


def _by_length(suite: str, results: Mapping[str, Mapping[str, Mapping[str, object]]]) -> list[str]:
    """Good and poor rates per input-length tercile (the set's own terciles)."""
    lines = [
        "Good / poor by input length:",
        "",
        "| variant | short | medium | long |",
        "|---|---|---|---|",
    ]
    for label, suites in results.items():
        by_length = (suites.get(suite) or {}).get("grades_by_length")
        if not by_length:
            continue
        cells = [
            f"{100 * part['good']['rate']:.0f} / {100 * part['poor']['rate']:.0f}"  # type: ignore[index]
            if (part := by_length.get(b))  # type: ignore[union-attr]
            else "—"
            for b in ("short", "medium", "long")
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _ifeval_means(results: Mapping[str, Mapping[str, Mapping[str, object]]]) -> list[str]:
    """The model card's figure (mean of the two levels) and the range a cap-free run could
    reach: greedy answers that stopped before the cap would not change, the cut ones might."""
    lines = [
        "Mean of prompt and instruction level (the model card's figure), and what the token cap"
        " may hide: with no cap, the strict mean would lie in the range shown.",
        "",
        "| variant | mean strict | mean loose | cap | answers cut by the cap | mean strict, no cap |",
        "|---|---|---|---|---|---|",
    ]
    for label, suites in results.items():
        figures = suites.get("ifeval")
        if figures is None:
            continue
        cap = figures.get("settings", {}).get("max_tokens", "—")  # type: ignore[union-attr]
        cut, reach = "—", "—"
        if "n_cut_at_cap" in figures:
            cut = f"{figures['n_cut_at_cap']} of {figures['n_prompts']}"
            prompt = figures["prompt_level_strict_bounds"]
            instruction = figures["instruction_level_strict_bounds"]
            low, high = ((a + b) / 2 for a, b in zip(prompt, instruction, strict=True))  # type: ignore[call-overload]
            reach = f"{100 * low:.1f}-{100 * high:.1f}"
        means = [f"{100 * figures[f'average_{m}']:.1f}" for m in ("strict", "loose")]  # type: ignore[operator]
        lines.append(f"| {label} | {' | '.join(means)} | {cap} | {cut} | {reach} |")
    return lines


def write_report(
    results: Mapping[str, Mapping[str, Mapping[str, object]]], out: Path, command: str
) -> Path:
    """`out/report.md` and one PNG per suite."""
    lines = [
        "# OpenAFM evaluation report",
        "",
        f"Made by `{command}`. Every figure is a percentage with its 95% bootstrap interval;"
        " per-example answers are in `cache/*.jsonl`.",
        "",
    ]
    for suite, (title, keys) in HEADLINES.items():
        if not any(suite in r for r in results.values()):
            continue
        lines += [f"## {title}", ""]
        if chart(suite, results, out / f"{suite}.png"):
            lines += [f"![{title}]({suite}.png)", ""]
        lines.append("| variant | " + " | ".join(name for _, name in keys) + " | n | examples/s |")
        lines.append("|---" * (len(keys) + 3) + "|")
        for label, suites in results.items():
            figures = suites.get(suite)
            if figures is None:
                continue
            n = figures.get("n", figures.get("n_prompts", "—"))
            cells = " | ".join(_cell(figures, k) for k, _ in keys)
            lines.append(f"| {label} | {cells} | {n} | {figures.get('examples_per_s', '—')} |")
        if suite in ANCHORS:
            lines += ["", f"Anchor: {ANCHORS[suite]}"]
        if keys is GRADED:
            lines += ["", *_by_length(suite, results)]
        if suite == "ifeval":
            lines += ["", *_ifeval_means(results)]
        lines.append("")
    page = out / "report.md"
    page.write_text("\n".join(lines))
    return page
