"""robots.txt opt-outs (RFC 9309) from dated snapshots, for crawling and for training use.

Snapshots are data: `DIR/DATE/HOST/robots.txt`, where DATE is `YYYY-MM-DD` (or `YYYYMMDD`).
The newest snapshot of a host applies to every document of that host, including documents
crawled before it was taken: an opt-out is honoured retroactively. Rules are evaluated with
Protego (longest match wins, `*` and `$` patterns, case-insensitive product tokens).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from protego import Protego

_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")


@dataclass(frozen=True)
class RobotsVerdict:
    """Whether a URL may be used; `reason` names the rule that forbids it."""

    allowed: bool
    reason: str = ""
    snapshot: str = ""


class RobotsSnapshots:
    """The newest robots.txt of each host under a snapshot directory."""

    def __init__(
        self, root: Path | str, crawler: str = "Applebot", training: str = "Applebot-Extended"
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"robots snapshot directory not found: {self.root}")
        self.crawler = crawler
        self.training = training
        self.files: dict[str, tuple[str, Path]] = {}
        for date_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            m = _DATE.match(date_dir.name)
            if not m:
                raise ValueError(
                    f"robots snapshot folder {date_dir.name!r} is not a date (YYYY-MM-DD)"
                )
            date = "-".join(m.groups())
            for host_dir in date_dir.iterdir():
                robots = host_dir / "robots.txt"
                if robots.is_file():
                    host = host_dir.name.lower()
                    if host not in self.files or self.files[host][0] < date:
                        self.files[host] = (date, robots)
        self._parsed: dict[str, Protego] = {}

    def _rules(self, host: str) -> tuple[Protego, str] | None:
        entry = self.files.get(host)
        if entry is None:
            return None
        date, path = entry
        if host not in self._parsed:
            # Undecodable bytes are replaced; lines Protego cannot parse are ignored (RFC 9309 §2.2).
            self._parsed[host] = Protego.parse(path.read_bytes().decode("utf-8", errors="replace"))
        return self._parsed[host], date

    def verdict(self, url: str) -> RobotsVerdict:
        """May `url` be crawled, and may its content be used for training?"""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        found = self._rules(host)
        if found is None:
            return RobotsVerdict(True)
        rules, date = found
        if not rules.can_fetch(url, self.crawler):
            return RobotsVerdict(False, "robots_disallow", date)
        if not rules.can_fetch(url, self.training):
            return RobotsVerdict(False, "training_opt_out", date)
        return RobotsVerdict(True, snapshot=date)
