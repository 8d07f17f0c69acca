"""How well main-text extraction keeps content and drops boilerplate, on labelled pages.

The labels are the trafilatura evaluation set's format: for each page, snippets that must
appear in the extracted text ("with") and snippets that must not ("without").
"""

from __future__ import annotations

import json
from pathlib import Path

from datatrove.data import Document

from openafm.data.readers import decode_html
from openafm.data.stages import ExtractMainText


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def extraction_scores(evaldata: Path | str, pages: Path | str) -> dict:
    """Share of keep-snippets kept and drop-snippets dropped over every page found in `pages`."""
    labels = json.loads(Path(evaldata).read_text())
    extractor = ExtractMainText()
    kept = keep_total = dropped = drop_total = n_pages = empty = 0
    for url, page in sorted(labels.items()):
        path = Path(pages) / page["file"]
        if not path.is_file():
            continue
        html = decode_html(path.read_bytes()) or ""
        doc = Document(html, url, metadata={"format": "html", "url": url})
        text = _norm(doc.text) if extractor.filter(doc) is True else ""
        empty += not text
        n_pages += 1
        keep, drop = page.get("with", []), page.get("without", [])
        kept += sum(_norm(s) in text for s in keep)
        dropped += sum(_norm(s) not in text for s in drop)
        keep_total, drop_total = keep_total + len(keep), drop_total + len(drop)
    if not n_pages:
        raise FileNotFoundError(f"none of the labelled pages is in {pages}")
    return {
        "pages": n_pages,
        "pages_without_text": empty,
        "keep_snippets": keep_total,
        "drop_snippets": drop_total,
        "keep_snippets_kept": kept / max(keep_total, 1),
        "drop_snippets_dropped": dropped / max(drop_total, 1),
    }
