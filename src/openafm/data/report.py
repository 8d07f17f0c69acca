"""Per-stage accounting of a curation run: `stats.json` and `report.md` from datatrove's logs."""

from __future__ import annotations

import json
from pathlib import Path

from openafm.files import write_json_atomic


class CurationError(RuntimeError):
    """A run that must not pass silently (a stage emptied a non-empty input)."""


def _count(value: object) -> int:
    """A counter as datatrove saved it: a number, or (merged across tasks) {"total": n, ...}."""
    return int(value["total"]) if isinstance(value, dict) else int(value)  # type: ignore[arg-type]


def stage_stats(out: Path, phases: list[tuple[str, list[str | None]]]) -> list[dict]:
    """One row per labelled pipeline step: documents in and out, removals by reason, seconds."""
    rows = []
    for phase, labels in phases:
        path = out / "logs" / phase / "stats.json"
        if not path.is_file():
            continue
        steps = json.loads(path.read_text())
        last: dict | None = None
        for label, step in zip(labels, steps, strict=False):
            stats = {
                k: _count(v) for k, v in step["stats"].items() if isinstance(v, int | float | dict)
            }
            if label is None:
                # A token counter or writer right after a stage sees that stage's output.
                tokens = stats.get("doc_len_tokens", stats.get("tokens"))
                if (
                    last is not None
                    and tokens is not None
                    and any(kind in step["name"] for kind in ("TOKENIZER", "WRITER"))
                ):
                    last["tokens_out"] = tokens
                continue
            if "total" in stats:  # a filter: datatrove omits counters that stayed at zero
                seen, kept = stats["total"], stats.get("forwarded", 0)
            else:  # the reader
                seen = kept = stats.get("documents", 0)
            reasons = {
                k.removeprefix("dropped_"): v for k, v in stats.items() if k.startswith("dropped_")
            }
            dropped = seen - kept
            if dropped > sum(reasons.values()):
                other = "duplicate" if label.endswith("dedup") else "unspecified"
                reasons[other] = dropped - sum(reasons.values())
            extra = {k: v for k, v in stats.items() if k.startswith("masked_")}
            seconds = step.get("time_stats", {})
            last = {
                "stage": label,
                "in": seen,
                "out": kept,
                "removed": dropped,
                "removed_by_reason": dict(sorted(reasons.items())),
                "chars_out": stats.get("doc_len", 0),
                "tokens_out": stats.get("doc_len_tokens", 0),
                "seconds": round(seconds.get("total", 0.0), 3)
                if isinstance(seconds, dict)
                else 0.0,
                **extra,
            }
            rows.append(last)
    return rows


def write_report(
    out: Path, phases: list[tuple[str, list[str | None]]], extra: dict | None = None
) -> dict:
    """Write `stats.json` and `report.md`; raise `CurationError` if a stage emptied its input."""
    rows = stage_stats(out, phases)
    report = {
        "documents_in": rows[0]["in"] if rows else 0,
        "documents_kept": rows[-1]["out"] if rows else 0,
        "stages": rows,
        **(extra or {}),
    }
    write_json_atomic(out / "stats.json", report)
    (out / "report.md").write_text(render_markdown(report))
    emptied = [r for r in rows if r["in"] > 0 and r["out"] == 0]
    if emptied:
        r = emptied[0]
        raise CurationError(
            f"stage {r['stage']!r} kept 0 of {r['in']} documents"
            f" (removed by reason: {r['removed_by_reason']}); see {out / 'report.md'}"
        )
    return report


def render_markdown(report: dict) -> str:
    lines = [
        "# Curation report",
        "",
        f"{report['documents_in']} documents read, {report['documents_kept']} kept.",
        "",
        "| stage | in | out | removed | reasons | tokens out | seconds |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in report["stages"]:
        reasons = ", ".join(f"{k} {v}" for k, v in r["removed_by_reason"].items()) or "-"
        lines.append(
            f"| {r['stage']} | {r['in']} | {r['out']} | {r['removed']} | {reasons}"
            f" | {r.get('tokens_out') or '-'} | {r['seconds']} |"
        )
    if "minhash" in report:
        m = report["minhash"]
        lines += [
            "",
            f"Fuzzy dedup: MinHash over 5-gram shingles, {m['bands']} bands x {m['rows']} rows"
            f" (threshold about {m['threshold']} Jaccard). Probability of removal by similarity:",
            "",
            "| Jaccard | " + " | ".join(m["p_duplicate"]) + " |",
            "|---|" + "---:|" * len(m["p_duplicate"]),
            "| p | " + " | ".join(str(v) for v in m["p_duplicate"].values()) + " |",
        ]
    return "\n".join(lines) + "\n"


def read_stats(out: Path | str) -> dict:
    path = Path(out) / "stats.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no stats.json in {out}: is it the output folder of `afm data curate`?"
        )
    return json.loads(path.read_text())
