"""The adapter directory: `adapter.safetensors` (16-bit A and B) + `adapter.json` (metadata).

Tensors are named after the seam they attach to: `layers.3.attn.q.lora_a` (rank x in) and
`layers.3.attn.q.lora_b` (out x rank). `adapter.json` holds the name, rank, alpha, targets,
layers, the signature of the base it was trained on, when it was made, and the training data
checksum, settings and evaluation results. Writes are atomic: a directory is built aside and
renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from openafm.adapters.lora import AdapterError, LoraAdapter, LoraConfig, check_adapter_name
from openafm.files import write_json_atomic

WEIGHTS_FILE = "adapter.safetensors"
META_FILE = "adapter.json"
FORMAT = "openafm-lora"
STORAGE_DTYPES = (torch.bfloat16, torch.float16)
_TENSOR = re.compile(r"(layers\.\d+\.(?:attn|mlp)\.\w+)\.lora_([ab])")


def save_adapter(
    adapter: LoraAdapter,
    directory: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write `adapter` (metadata from `adapter.metadata`) to `directory`, replacing it atomically."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, (a, b) in adapter.pairs.items():
        tensors[f"{path}.lora_a"] = a.detach().to(dtype).contiguous()
        tensors[f"{path}.lora_b"] = b.detach().to(dtype).contiguous()
    meta = {
        "format": FORMAT,
        "format_version": 1,
        "name": adapter.name,
        **adapter.config.to_dict(),
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": adapter.num_parameters,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **{k: v for k, v in adapter.metadata.items() if k not in ("format", "format_version")},
    }
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for path in (tmp / WEIGHTS_FILE, tmp / META_FILE):
            path.chmod(0o644)
        tmp.chmod(0o755)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def replace_dir(new: Path, target: Path) -> None:
    """Put directory `new` where `target` is, replacing it with two renames."""
    if target.exists():
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def read_adapter_meta(directory: str | Path) -> dict[str, object]:
    """`adapter.json` of an adapter directory, checked for the fields every adapter has."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise AdapterError(f"{directory} is not an adapter: {META_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{meta_path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{meta_path} must hold a JSON object")
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{meta_path}: format must be {FORMAT!r}, got {meta.get('format')!r}")
    for key, kind in (("name", str), ("rank", int), ("alpha", (int, float)), ("targets", list)):
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise AdapterError(f"{meta_path}: field {key!r} is missing or has the wrong type")
    if not all(isinstance(t, str) for t in meta["targets"]):  # type: ignore[attr-defined]
        raise AdapterError(f"{meta_path}: 'targets' must be a list of projection names")
    return meta


def config_from_meta(meta: dict[str, object], where: object) -> LoraConfig:
    layers = meta.get("layers")
    if layers is not None and not (
        isinstance(layers, list) and all(isinstance(i, int) for i in layers)
    ):
        raise AdapterError(f"{where}: 'layers' must be a list of integers or null")
    try:
        return LoraConfig(
            rank=meta["rank"],  # type: ignore[arg-type]
            alpha=float(meta["alpha"]),  # type: ignore[arg-type]
            targets=tuple(meta["targets"]),  # type: ignore[arg-type]
            layers=None if layers is None else tuple(layers),
        )
    except AdapterError as exc:
        raise AdapterError(f"{where}: {exc}") from None


def load_adapter(directory: str | Path) -> LoraAdapter:
    """Read and check an adapter directory; raises `AdapterError` with the reason."""
    directory = Path(directory)
    meta = read_adapter_meta(directory)
    config = config_from_meta(meta, directory / META_FILE)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"{directory}: {WEIGHTS_FILE} is missing")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{weights} is not a readable safetensors file: {exc}") from None
    pairs = _pairs_from_tensors(tensors, config, weights)
    name = check_adapter_name(str(meta["name"]))
    metadata = {k: v for k, v in meta.items() if k not in ("rank", "alpha", "targets", "layers")}
    return LoraAdapter(name, config, pairs, metadata)


def _pairs_from_tensors(
    tensors: dict[str, torch.Tensor], config: LoraConfig, where: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _TENSOR.fullmatch(key)
        if not m or m.group(1).rsplit(".", 1)[1] not in config.targets:
            raise AdapterError(f"{where}: unexpected tensor {key!r} for targets {config.targets}")
        if tensor.dtype not in STORAGE_DTYPES or tensor.dim() != 2:
            raise AdapterError(
                f"{where}: {key} must be a 2-D bfloat16 or float16 matrix,"
                f" got {tensor.dtype} of shape {tuple(tensor.shape)}"
            )
        halves.setdefault(m.group(1), {})[m.group(2)] = tensor
    pairs = {}
    for path, half in sorted(halves.items()):
        if set(half) != {"a", "b"}:
            raise AdapterError(f"{where}: {path} needs both lora_a and lora_b")
        a, b = half["a"], half["b"]
        if a.shape[0] != config.rank or b.shape[1] != config.rank:
            raise AdapterError(
                f"{where}: {path} has A {tuple(a.shape)} and B {tuple(b.shape)};"
                f" rank {config.rank} needs A (rank x in) and B (out x rank)"
            )
        pairs[path] = (a, b)
    if not pairs:
        raise AdapterError(f"{where} holds no adapter tensors")
    return pairs


def check_base(adapter: LoraAdapter, signature: str, *, force: bool = False) -> None:
    """Refuse an adapter trained on another base (unless `force`)."""
    trained_on = adapter.metadata.get("base_signature")
    if trained_on != signature and not force:
        raise AdapterError(
            f"adapter {adapter.name!r} was trained on base {str(trained_on)[:12]}…, but the loaded"
            f" base is {signature[:12]}…; its output would be meaningless (use --force to load"
            " it anyway)"
        )


def record_evaluation(
    directory: str | Path, data: str, role: str, report: dict[str, object]
) -> None:
    """Store an evaluation report in `adapter.json` under `evaluation[data][role]` (atomically)."""
    meta_path = Path(directory) / META_FILE
    meta = read_adapter_meta(directory)
    evaluation = meta.setdefault("evaluation", {})
    if not isinstance(evaluation, dict):
        raise AdapterError(f"{meta_path}: 'evaluation' must be a JSON object")
    evaluation.setdefault(data, {})[role] = report
    write_json_atomic(meta_path, meta)
