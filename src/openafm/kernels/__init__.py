"""Native CPU kernels for the compressed model, with a pure-PyTorch reference beside each.

- `lut_linear`: products with palettized weights (lookup tables + bit-plane indices), for one
  to 16 activation rows (decode, batched decode, speculative verification);
- `lut_dequantize`: the dense matrix of a palettized weight (prefill: then a GEMM);
- `int8_linear`: products with int8 rows and a scale per row (the 8-bit output head);
- `rms_norm`, `rope`: RMSNorm and rotary embedding in one call each (instead of six or seven
  small PyTorch operations, whose dispatch dominates one-token steps);
- `decoder.DecoderStack`: every decoder layer of a palettized model in one call (decode and
  speculative verification).

`mode()` says how products are computed: `exact` (native, float32 tables and activations: the
dequantize-then-matmul result to float32 rounding), `default` (native, for speed at negligible
quality cost: as `exact`, except that the int8 head rounds its activations to int16 per row,
relative error ≤ 2^-15 of the row's largest value, and sums in integers), `fast` (as `default`,
and 4-bit products use int8 tables with integer sums where the CPU has AVX-512 VNNI: see
`int8_tables`; a small quality cost, reported by the benchmark) or `reference` (PyTorch
only). The native library is compiled on first use (see `build`); `isa()` names the
instruction set in use.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from openafm.kernels import reference
from openafm.kernels.build import load_native
from openafm.kernels.repack import SUPPORTED_BITS, planes_nbytes, repack, unpack

MODES = ("reference", "exact", "default", "fast")
MODE_ENV = "OPENAFM_KERNEL"
MAX_KERNEL_ROWS = 16  # more activation rows: dequantize once, then a GEMM
ISA_NAMES = {1: "portable C++", 2: "AVX2+FMA", 3: "AVX-512"}
ISA_CODES = {"best": 0, "portable": 1, "avx2": 2, "avx512": 3}

_mode: str | None = None  # resolved on first use (products ask for it on every call)


def set_mode(mode: str | None) -> None:
    """Choose how compressed products are computed for this process (see `MODES`); None goes
    back to `$OPENAFM_KERNEL` (or `default`)."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown kernel mode {mode!r}; choose one of {', '.join(MODES)}")
    global _mode
    _mode = None if mode is None else _usable(mode)


@contextmanager
def using(mode: str) -> Iterator[None]:
    """Compute compressed products in `mode` inside the block."""
    global _mode
    before = _mode
    set_mode(mode)
    try:
        yield
    finally:
        _mode = before


def _usable(chosen: str) -> str:
    return chosen if chosen == "reference" or load_native() else "reference"


def mode() -> str:
    """The mode in use: the one set, else `$OPENAFM_KERNEL`, else `default`; `reference`
    when the native library is unavailable."""
    global _mode
    if _mode is None:
        chosen = os.environ.get(MODE_ENV) or "default"
        if chosen not in MODES:
            raise ValueError(f"{MODE_ENV}={chosen!r} is not one of {', '.join(MODES)}")
        _mode = _usable(chosen)
    return _mode


def native() -> bool:
    """Whether products go through the native kernels."""
    return (_mode or mode()) != "reference"


def isa() -> str:
    """The instruction set the native kernels use on this CPU, or `none`."""
    if not load_native():
        return "none"
    return ISA_NAMES[int(torch.ops.openafm.best_isa())]


def int8_tables_apply(isa: str = "best") -> bool:
    """Whether 4-bit products given int8 tables compute with them on this CPU (AVX-512 with
    VNNI); elsewhere the float tables serve."""
    return load_native() and bool(torch.ops.openafm.int8_tables_apply(ISA_CODES[isa]))


def supported_isas() -> list[str]:
    """Every native path this CPU can run (for tests and benchmarks)."""
    if not load_native():
        return []
    best = int(torch.ops.openafm.best_isa())
    return [name for name, code in ISA_CODES.items() if 1 <= code <= best]


def lut_linear(
    x: torch.Tensor,
    planes: torch.Tensor,
    tables: torch.Tensor,
    scale: torch.Tensor | None,
    bits: int,
    group: int,
    out_features: int,
    *,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    int8_tables: tuple[torch.Tensor, torch.Tensor] | None = None,
    isa: str = "best",
) -> torch.Tensor:
    """`x Wᵀ` in float32 for a palettized W in the kernels' layout (tables, scale: float32),
    plus `s · (x Aᵀ) Bᵀ` when `lora` = (A, B, s) is given (factors both float32 or both
    bfloat16). With `int8_tables` (see `int8_tables`), 4-bit weights compute with them and x
    rounded to int16 per row where the CPU has AVX-512 VNNI (`reference.lut_linear` says what
    that computes); elsewhere the float tables serve."""
    if native():
        a, b, s = lora if lora is not None else (None, None, 1.0)
        t8, ts = int8_tables if int8_tables is not None else (None, None)
        return torch.ops.openafm.lut_linear(
            x, planes, tables, scale, bits, group, out_features, ISA_CODES[isa], a, b, s, t8, ts
        )
    y = reference.lut_linear(x, planes, tables, scale, bits, group, out_features)
    return y if lora is None else y + reference.low_rank(x, *lora)


def lut_linear_many(
    x: torch.Tensor,
    weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, int, int]],
    loras: list[tuple[torch.Tensor, torch.Tensor, float] | None],
    int8_tables: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
    *,
    isa: str = "best",
) -> list[torch.Tensor]:
    """`lut_linear` for several weights of the same input (q/k/v, gate/up) in one call: each
    weight is (planes, tables, scale, bits, group, out_features), with its optional LoRA and
    int8 tables."""
    if not native():
        return [
            lut_linear(x, *w, lora=lora, isa=isa) for w, lora in zip(weights, loras, strict=True)
        ]
    tables8 = int8_tables or [None] * len(weights)
    planes, tables, scales, bits, groups, outs = (list(c) for c in zip(*weights, strict=True))
    a = [None if lora is None else lora[0] for lora in loras]
    b = [None if lora is None else lora[1] for lora in loras]
    s = [1.0 if lora is None else lora[2] for lora in loras]
    t8 = [None if t is None else t[0] for t in tables8]
    ts = [None if t is None else t[1] for t in tables8]
    return torch.ops.openafm.lut_linear_many(
        x, planes, tables, scales, bits, groups, outs, ISA_CODES[isa], a, b, s, t8, ts
    )


def int8_tables(tables: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """Float tables (groups · 2^bits entries) → int8 tables for the integer kernel: per group,
    entries rounded to 127 steps of the group's largest magnitude, stored + 128 as uint8, and
    the step (float32)."""
    t = tables.float().view(-1, 1 << bits)
    step = (t.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(t / step.unsqueeze(1)).clamp(-127, 127)
    return (q + 128).to(torch.uint8).contiguous().view(-1), step.contiguous()


def lut_dequantize(
    planes: torch.Tensor,
    tables: torch.Tensor,
    scale: torch.Tensor | None,
    bits: int,
    group: int,
    out_features: int,
    in_features: int,
    *,
    isa: str = "best",
) -> torch.Tensor:
    """The dense float32 matrix of a palettized W in the kernels' layout."""
    if native():
        return torch.ops.openafm.lut_dequantize(
            planes, tables, scale, bits, group, out_features, in_features, ISA_CODES[isa]
        )
    return reference.lut_dequantize(planes, tables, scale, bits, group, out_features, in_features)


def int8_linear(
    x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, *, isa: str = "best"
) -> torch.Tensor:
    """`x Vᵀ · scale` in float32 for int8 rows V (scale: float32, one per row)."""
    current = mode()
    if current != "reference":
        quantize = current in ("default", "fast")
        return torch.ops.openafm.int8_linear(x, values, scale, ISA_CODES[isa], quantize)
    return reference.int8_linear(x, values, scale)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, "rotate half" layout (float32; see `reference.rope`)."""
    if native():
        return torch.ops.openafm.rope(x, cos, sin)
    return reference.rope(x, cos, sin)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (float32)."""
    if native():
        return torch.ops.openafm.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


__all__ = [
    "MAX_KERNEL_ROWS",
    "MODES",
    "SUPPORTED_BITS",
    "int8_linear",
    "int8_tables",
    "int8_tables_apply",
    "isa",
    "load_native",
    "lut_dequantize",
    "lut_linear",
    "lut_linear_many",
    "mode",
    "native",
    "planes_nbytes",
    "repack",
    "rms_norm",
    "rope",
    "set_mode",
    "supported_isas",
    "unpack",
    "using",
]
