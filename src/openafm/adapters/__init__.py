"""Feature adapters: LoRA on the frozen base, the adapter file format, registry, trainer."""

from openafm.adapters.adapter_file import check_base, load_adapter, read_adapter_meta, save_adapter
from openafm.adapters.lora import (
    TARGETS,
    AdapterError,
    LoraAdapter,
    LoraConfig,
    check_adapter_name,
    detach,
    set_deltas,
)

__all__ = [
    "TARGETS",
    "AdapterError",
    "LoraAdapter",
    "LoraConfig",
    "check_adapter_name",
    "check_base",
    "detach",
    "load_adapter",
    "read_adapter_meta",
    "save_adapter",
    "set_deltas",
]
