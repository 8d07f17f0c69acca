"""What every evaluation records beside its figures, so that a result can be traced, compared
and re-scored without generating again: the command, the model's and adapter's signatures, the
data's checksum and the decoding settings; and reading such responses back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from openafm.adapters.adapter_file import WEIGHTS_FILE
from openafm.adapters.registry import find_adapter
from openafm.files import read_jsonl, sha256_file


def adapter_signature(adapter: str | None) -> str | None:
    """sha256 of an adapter's weights file (None for no adapter)."""
    return None if adapter is None else sha256_file(find_adapter(adapter) / WEIGHTS_FILE)


def provenance(
    *,
    command: str,
    model: str,
    model_signature: str | None,
    adapter: str | None,
    data: Path | Sequence[Path],
    decoding: dict[str, object] | None,
) -> dict[str, object]:
    """The record that travels with every evaluation result (several data files: lists)."""
    several = not isinstance(data, Path)
    return {
        "command": command,
        "model": model,
        "model_signature": model_signature,
        "adapter": adapter,
        "adapter_signature": adapter_signature(adapter),
        "data": [str(p) for p in data] if several else str(data),
        "data_sha256": [sha256_file(p) for p in data] if several else sha256_file(data),
        "decoding": decoding,
    }


def responses_by_prompt(path: Path, prompts: Sequence[str]) -> list[str]:
    """The responses of a JSON Lines file with `prompt` and `response` fields (Google's
    `input_response_data` format, or an evaluation's predictions), in the order of `prompts`."""
    by_prompt: dict[str, str] = {}
    for n, record in read_jsonl(path):
        if not isinstance(record, Mapping) or not isinstance(record.get("response"), str):
            raise ValueError(f"{path}:{n}: needs string fields prompt and response")
        by_prompt[str(record.get("prompt"))] = record["response"]
    missing = [i for i, p in enumerate(prompts) if p not in by_prompt]
    if missing:
        raise ValueError(
            f"{path} has no response to {len(missing)} of the {len(prompts)} prompts"
            f" (the first: {prompts[missing[0]][:60]!r})"
        )
    return [by_prompt[p] for p in prompts]
