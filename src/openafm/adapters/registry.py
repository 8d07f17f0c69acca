"""Where adapters live: `$OPENAFM_HOME/adapters/NAME/`, then the ones shipped in `models/adapters/`.

A user's adapter of the same name shadows a shipped one. Names are checked before they touch
the file system, so a name can never reach outside these folders; a path to an adapter
directory (containing a '/') is used as given.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from openafm.adapters.adapter_file import WEIGHTS_FILE, read_adapter_meta
from openafm.adapters.lora import AdapterError, check_adapter_name
from openafm.io import openafm_home

SHIPPED_DIR = Path(__file__).resolve().parents[3] / "models" / "adapters"


def user_adapters_dir() -> Path:
    return openafm_home() / "adapters"


def search_path() -> list[tuple[str, Path]]:
    """(source, folder) pairs searched in order: the user's adapters, then the shipped ones."""
    return [("user", user_adapters_dir()), ("shipped", SHIPPED_DIR)]


def find_adapter(name_or_path: str | Path) -> Path:
    """The directory of an adapter given by name (registry) or by path (contains a '/')."""
    text = str(name_or_path)
    if "/" in text or "\\" in text:
        path = Path(text).expanduser()
        read_adapter_meta(path)
        return path
    check_adapter_name(text)
    for _, folder in search_path():
        if (folder / text / "adapter.json").is_file():
            return folder / text
    known = ", ".join(a["name"] for a in list_adapters()) or "none"
    raise AdapterError(f"unknown adapter {text!r} (installed: {known})")


def list_adapters() -> list[dict[str, object]]:
    """Every findable adapter, once per name (a user's shadows a shipped one)."""
    seen: dict[str, dict[str, object]] = {}
    for source, folder in search_path():
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name in seen or not (path / "adapter.json").is_file():
                continue
            try:
                meta = read_adapter_meta(path)
            except AdapterError as exc:
                seen[path.name] = {
                    "name": path.name,
                    "source": source,
                    "path": str(path),
                    "error": str(exc),
                }
                continue
            weights = path / WEIGHTS_FILE
            seen[path.name] = {
                "name": path.name,
                "source": source,
                "path": str(path),
                "rank": meta["rank"],
                "alpha": meta["alpha"],
                "targets": meta["targets"],
                "parameters": meta.get("parameters"),
                "bytes": weights.stat().st_size if weights.exists() else 0,
                "base_signature": meta.get("base_signature"),
                "created": meta.get("created"),
            }
    return list(seen.values())


def remove_adapter(name: str) -> Path:
    """Delete a user adapter; shipped adapters are part of the repository and stay."""
    path = find_adapter(check_adapter_name(name))
    if path.parent != user_adapters_dir():
        raise AdapterError(f"{name!r} is a shipped adapter ({path}); it cannot be removed")
    shutil.rmtree(path)
    return path
