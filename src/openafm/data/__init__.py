"""Web-data curation: read, opt-out, extract, filter, mask, deduplicate, report."""

from openafm.data.config import ALL_STAGES, CurateConfig
from openafm.data.pii import PII_TYPES, PiiSpan, find_pii, mask_pii
from openafm.data.pipeline import curate
from openafm.data.report import CurationError, read_stats, render_markdown
from openafm.data.robots import RobotsSnapshots, RobotsVerdict

__all__ = [
    "ALL_STAGES",
    "PII_TYPES",
    "CurateConfig",
    "CurationError",
    "PiiSpan",
    "RobotsSnapshots",
    "RobotsVerdict",
    "curate",
    "find_pii",
    "mask_pii",
    "read_stats",
    "render_markdown",
]
