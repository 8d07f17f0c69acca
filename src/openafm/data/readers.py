"""Reading web data into datatrove `Document`s: WARC/ARC records, HTML files, JSONL.

Nothing is dropped silently here: a record that cannot become a document (truncated,
undecodable, empty, over the size limit, not HTML) is still emitted, with
`metadata["reject"]` naming why, and the intake stage records it as removed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from openafm.files import open_text

MAX_PAGE_BYTES = 10 * 1024 * 1024
WARC_SUFFIXES = (".warc", ".warc.gz", ".arc", ".arc.gz")
HTML_SUFFIXES = (".html", ".htm")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
_CHARSET = re.compile(rb"charset=[\"']?([A-Za-z0-9_.:-]+)", re.IGNORECASE)


def input_files(paths: list[str]) -> list[str]:
    """Every readable input under `paths` (files, or folders searched recursively), sorted."""
    found: list[str] = []
    suffixes = WARC_SUFFIXES + HTML_SUFFIXES + JSONL_SUFFIXES
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        if path.is_file():
            found.append(str(path.resolve()))
        else:
            found += [
                str(p.resolve())
                for p in path.rglob("*")
                if p.is_file() and p.name.lower().endswith(suffixes)
            ]
    if not found:
        raise FileNotFoundError(f"no WARC, ARC, HTML or JSONL files under {', '.join(paths)}")
    return sorted(set(found))


def decode_html(body: bytes, content_type: str = "") -> str | None:
    """HTML bytes as text: the declared charset (header, then meta tag), then UTF-8; None if neither fits."""
    declared = _CHARSET.search(content_type.encode()) or _CHARSET.search(body[:4096])
    for charset in ([declared.group(1).decode()] if declared else []) + ["utf-8"]:
        try:
            return body.decode(charset)
        except (UnicodeDecodeError, LookupError):
            continue
    return None


def _html_document(body: bytes, doc_id: str, metadata: dict, content_type: str = "") -> Document:
    if len(body) > MAX_PAGE_BYTES:
        return Document("", doc_id, metadata=metadata | {"reject": "too_large"})
    if not body.strip():
        return Document("", doc_id, metadata=metadata | {"reject": "empty_page"})
    html = decode_html(body, content_type)
    if html is None:
        return Document("", doc_id, metadata=metadata | {"reject": "undecodable"})
    return Document(html, doc_id, metadata=metadata)


def read_warc(path: str) -> Iterator[Document]:
    """Response records of a WARC (or legacy ARC) file; truncation ends the file with a reject."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    index = 0
    try:
        with open(path, "rb") as stream:
            for index, record in enumerate(
                ArchiveIterator(stream, arc2warc=True, check_digests=True)
            ):
                if record.rec_type not in ("response", "resource", "conversion"):
                    continue
                headers = record.rec_headers
                doc_id = headers.get_header("WARC-Record-ID") or f"{path}#{index}"
                url = headers.get_header("WARC-Target-URI") or ""
                date = headers.get_header("WARC-Date") or ""
                content_type = ""
                if record.http_headers is not None:
                    content_type = record.http_headers.get_header("Content-Type") or ""
                elif record.rec_type != "response":
                    content_type = headers.get_header("Content-Type") or ""
                body = record.content_stream().read(MAX_PAGE_BYTES + 1)
                status = record.http_headers.get_statuscode() if record.http_headers else None
                meta = {"url": url, "date": date, "source": path, "format": "html"}
                if record.digest_checker.passed is False:  # truncated or corrupted on disk
                    yield Document("", doc_id, metadata=meta | {"reject": "corrupt_record"})
                elif status not in ("200", None):
                    yield Document("", doc_id, metadata=meta | {"reject": f"http_{status}"})
                elif content_type and "html" not in content_type.lower():
                    yield Document("", doc_id, metadata=meta | {"reject": "not_html"})
                else:
                    yield _html_document(body, doc_id, meta, content_type)
    except (ArchiveLoadFailed, EOFError, OSError, ValueError, AttributeError) as err:
        # warcio meets a damaged record with any of these (AttributeError: a header block
        # cut short); the rest of the file is lost either way
        yield Document(
            "",
            f"{path}#{index}-truncated",
            metadata={"source": path, "reject": "truncated_record", "error": str(err)[:200]},
        )


def read_html_file(path: str) -> Iterator[Document]:
    meta = {"url": Path(path).name, "date": "", "source": path, "format": "html"}
    yield _html_document(Path(path).read_bytes(), path, meta)


def read_jsonl(path: str) -> Iterator[Document]:
    """`{"text": ..., "id"?: ..., "url"?: ...}` lines: already text, so extraction is skipped."""
    with open_text(path, errors="replace") as f:
        for n, line in enumerate(f):
            doc_id = f"{path}#{n}"
            try:
                row = json.loads(line)
                text = row["text"]
                if not isinstance(text, str):
                    raise TypeError("text is not a string")
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                meta = {"source": path, "reject": "malformed_json", "error": str(err)[:200]}
                yield Document("", doc_id, metadata=meta)
                continue
            meta = {k: v for k, v in row.items() if k not in ("text", "id")}
            meta |= {"source": path, "format": "text"}
            if not text.strip():
                meta["reject"] = "empty_page"
            yield Document(text, str(row.get("id", doc_id)), metadata=meta)


def read_web_file(path: str) -> Iterator[Document]:
    """Documents of one input file, by its suffix."""
    name = path.lower()
    if name.endswith(WARC_SUFFIXES):
        return read_warc(path)
    if name.endswith(HTML_SUFFIXES):
        return read_html_file(path)
    return read_jsonl(path)


class WebReader(PipelineStep):
    """Reads its share of the input files (task `rank` of `world_size` takes every n-th file)."""

    name = "📖 web reader"
    type = "📖 - READER"

    def __init__(self, files: list[str]):
        super().__init__()
        self.files = files

    def run(
        self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1
    ) -> DocumentsPipeline:
        for path in self.files[rank::world_size]:
            for doc in read_web_file(path):
                self.stat_update("documents")
                yield doc
