"""How `afm serve` runs: one frozen record of its options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from openafm.runtime.adapter_cache import DEFAULT_BUDGET_BYTES


@dataclass(frozen=True)
class ServeConfig:
    """The server's options (the CLI's flags, with the same defaults)."""

    model: str | None = None  # a known name, GGUF file or directory (None: the default model)
    adapters: tuple[Path, ...] | None = None  # folders of adapters (None: the shipped ones)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 600.0
    max_tokens_default: int = 256
    adapter_budget_bytes: int = DEFAULT_BUDGET_BYTES
    private: bool = True
