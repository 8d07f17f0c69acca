"""Compressed weights the linear seam computes with: lookup tables (palettization) and int8 rows.

Neither keeps a dense copy: `PalettizedWeight` holds bit-packed indices, one float16 lookup
table per group of output rows and an optional float16 scale per row; `Int8Rows` holds int8
values with one scale per row (it also serves as an 8-bit embedding). Products of a few rows
(decode) run on the native lookup-table and int8 kernels of `openafm.kernels`, which read the
compressed bytes directly; the first such product repacks a palettized weight's indices into
the kernels' layout, in place of the bit-packed rows (which are rebuilt for saving). Products
of many rows (prefill) rebuild the dense matrix transiently, then multiply.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from openafm import kernels

if TYPE_CHECKING:
    from openafm.model.transformer import Transformer

_WEIGHT_INT8_MM = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
_INT8_TABLES_APPLY = cache(kernels.int8_tables_apply)
_KERNEL_ALIGNMENT = 64  # bytes; PyTorch's CPU allocator aligns to this


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-pack unsigned indices `(rows, n)` (n a multiple of 8) into uint8 `(rows, n*bits/8)`.

    Little-endian bit stream per row: index `i` occupies bits `[i*bits, (i+1)*bits)`, so with
    4 bits the first index is a byte's low nibble.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, not {bits}")
    rows, n = indices.shape
    if n % 8:
        raise ValueError(f"row length {n} is not a multiple of 8")
    if indices.numel() and int(indices.max()) >= 1 << bits:
        raise ValueError(f"an index does not fit in {bits} bits")
    chunks = indices.to(torch.int64).view(rows, n // 8, 8)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    words = (chunks << shifts).sum(-1)  # 8 indices -> one integer of 8*bits bits
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    packed = (words.unsqueeze(-1) >> byte_shifts) & 0xFF
    return packed.to(torch.uint8).reshape(rows, n // 8 * bits)


def unpack_indices(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_indices`: int64 indices `(rows, n)`."""
    rows, nbytes = packed.shape
    if bits == 8:
        return packed.to(torch.int64)
    device = packed.device
    if bits in (1, 2, 4):
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.uint8, device=device) * bits
        values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return values.reshape(rows, nbytes * per_byte).to(torch.int64)
    groups = packed.view(rows, nbytes // bits, bits).to(torch.int64)
    words = (groups << (torch.arange(bits, dtype=torch.int64, device=device) * 8)).sum(-1)
    values = (words.unsqueeze(-1) >> (torch.arange(8, dtype=torch.int64, device=device) * bits)) & (
        (1 << bits) - 1
    )
    return values.reshape(rows, nbytes // bits * 8)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a product with `x` runs in: autocast's on `x`'s device, else `x`'s own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _kernel_rows(x: torch.Tensor) -> int | None:
    """Activation rows of a product the native kernels should compute, or None.

    Inference on the CPU with float activations only: training (autograd) and tracing (export)
    keep the PyTorch path.
    """
    if (
        x.device.type != "cpu"
        or not x.dtype.is_floating_point
        or (torch.is_grad_enabled() and x.requires_grad)
        or torch.jit.is_tracing()
        or not kernels.native()
    ):
        return None
    return x.numel() // x.shape[-1] if x.shape[-1] else None


class LowRankUpdate(Protocol):
    """An adapter's update of a projection's output (`openafm.model.linear.LowRankDelta`)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float | torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


LoraArgs = tuple[torch.Tensor, torch.Tensor, float]
Int8Tables = tuple[torch.Tensor, torch.Tensor]
NativePlan = tuple[tuple, LoraArgs | None, Int8Tables | None]


def _plus(y: torch.Tensor, delta: LowRankUpdate | None, x: torch.Tensor) -> torch.Tensor:
    return y if delta is None else y + delta(x)


def finish_native(
    y: torch.Tensor, x: torch.Tensor, delta: LowRankUpdate | None, fused: LoraArgs | None
) -> torch.Tensor:
    """A native product's float32 output in the computation's dtype, plus `delta(x)` unless the
    kernel already added it."""
    y = y.to(_compute_dtype(x))
    return y if fused is not None else _plus(y, delta, x)


def _fusable(delta: LowRankUpdate | None) -> LoraArgs | None:
    """(A, B, scale) when the native kernel can add this update itself: one adapter for the
    whole batch, both factors float32 or both bfloat16 (A contiguous, B contiguous or
    column-major), nothing to differentiate."""
    if (
        delta is None
        or delta.a.dim() != 2
        or not isinstance(delta.scale, float)
        or delta.a.dtype not in (torch.float32, torch.bfloat16)
        or delta.b.dtype != delta.a.dtype
        or not delta.a.is_contiguous()
        or not (delta.b.is_contiguous() or delta.b.t().is_contiguous())
        or (torch.is_grad_enabled() and (delta.a.requires_grad or delta.b.requires_grad))
    ):
        return None
    return delta.a, delta.b, delta.scale


def adapter_dtype(model: Transformer) -> torch.dtype:
    """The dtype an inference adapter's factors are held in on `model`: bfloat16 where its
    projections are palettized on the CPU in float32 (the native kernels add the update from
    bfloat16 factors: half the bytes a decode step reads for it, and the precision adapters are
    stored in), else the dtype the model computes in."""
    palettized = any(isinstance(m, PalettizedWeight) for m in model.modules())
    if palettized and model.dtype == torch.float32 and model.device.type == "cpu":
        return torch.bfloat16
    return model.dtype


def _buffer_bits_of(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size() * 8


def _buffer_bits(module: nn.Module) -> int:
    """Bits of every stored tensor of `module` (its buffers)."""
    return sum(_buffer_bits_of(t) for t in module.buffers())


class PalettizedWeight(nn.Module):
    """A weight `(out, in)` whose row `r` is `scale[r] · lut[r // group][indices[r]]`."""

    def __init__(
        self,
        indices: torch.Tensor,
        lut: torch.Tensor,
        scale: torch.Tensor | None,
        *,
        bits: int,
        group_size: int,
        in_features: int,
    ) -> None:
        super().__init__()
        out_features = indices.shape[0]
        if out_features % group_size:
            raise ValueError(f"group size {group_size} does not divide {out_features} rows")
        if lut.shape != (out_features // group_size, 1 << bits):
            raise ValueError(f"lookup tables of shape {tuple(lut.shape)} do not fit {bits} bits")
        if indices.shape[1] * 8 != in_features * bits:
            raise ValueError(f"packed indices of shape {tuple(indices.shape)} do not fit")
        self.bits = bits
        self.group_size = group_size
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("indices", indices)
        self.register_buffer("lut", lut)
        self.register_buffer("scale", scale)
        # the kernels' layout (see `repack`): bit-plane indices, float32 tables and scales
        self.register_buffer("planes", None, persistent=False)
        self.register_buffer("tables", None, persistent=False)
        self.register_buffer("row_scale", None, persistent=False)
        self.register_buffer("tables8", None, persistent=False)  # 4 bits: see kernels.int8_tables
        self.register_buffer("table_step", None, persistent=False)
        self.dense_cache: torch.Tensor | None = None  # see `dense_copies`

    @property
    def repacked(self) -> bool:
        return self.planes is not None

    def repack(self) -> None:
        """Move the indices into the native kernels' layout (once; no copy is kept)."""
        if self.planes is not None:
            return
        idx = unpack_indices(self.indices, self.bits)
        self.planes = kernels.repack(idx, self.bits)
        self.tables = self.lut.float().flatten().contiguous()
        self.row_scale = None if self.scale is None else self.scale.float().contiguous()
        if self.bits == 4:
            self.tables8, self.table_step = kernels.int8_tables(self.tables, self.bits)
        self.indices = torch.empty(0, dtype=torch.uint8)

    def packed_indices(self) -> torch.Tensor:
        """The bit-packed rows `(out, in * bits / 8)`, the on-disk form."""
        if self.planes is None:
            return self.indices
        idx = kernels.unpack(self.planes.cpu(), self.bits, self.out_features, self.in_features)
        return pack_indices(idx, self.bits).to(self.planes.device)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.planes is not None:
            destination[prefix + "indices"] = self.packed_indices()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.planes is not None and prefix + "indices" in state_dict:
            self.indices = torch.empty_like(state_dict[prefix + "indices"])
            self.planes = self.tables = self.row_scale = self.tables8 = self.table_step = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def _kernel_args(self) -> tuple:
        """What `kernels.lut_linear` takes after x (held in a plain attribute: fast to reach)."""
        args = self.__dict__.get("_args")
        if args is None or args[0] is not self.planes:
            args = (self.planes, self.tables, self.row_scale, self.bits, self.group_size)
            args += (self.out_features,)
            self.__dict__["_args"] = args
        return args

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense matrix (transient: callers must not keep it)."""
        if self.dense_cache is not None and self.dense_cache.dtype == dtype:
            return self.dense_cache
        if self.planes is not None and self.planes.device.type == "cpu" and kernels.native():
            w = kernels.lut_dequantize(*self._kernel_args, self.in_features)
            return w.to(dtype)
        idx = unpack_indices(self.packed_indices(), self.bits)
        offsets = torch.arange(self.out_features, device=idx.device)
        offsets = offsets // self.group_size * (1 << self.bits)
        w = torch.take(self.lut.to(dtype), idx + offsets.unsqueeze(1))
        if self.scale is not None:
            w = w * self.scale.to(dtype).unsqueeze(1)
        return w

    def native_product(self, x: torch.Tensor, delta: LowRankUpdate | None) -> NativePlan | None:
        """How the native kernel computes `x Wᵀ` (weight arguments, and `delta` when the kernel
        can add it itself), or None for the PyTorch path (training, tracing, an odd width). The
        first call repacks the weight into the kernels' layout, which prefill's rebuild of the
        dense matrix then reads too."""
        rows = _kernel_rows(x) if self.dense_cache is None else None
        if rows is None or self.bits not in kernels.SUPPORTED_BITS:
            return None
        self.repack()
        if rows > kernels.MAX_KERNEL_ROWS:
            return None
        lora = None if delta is None else _fusable(delta)
        return self._kernel_args, lora, self.int8_tables()

    def int8_tables(self) -> Int8Tables | None:
        """The int8 tables the `fast` kernel mode computes with (4 bits, where the CPU has the
        integer kernel), else None."""
        if self.tables8 is None or self.table_step is None or kernels.mode() != "fast":
            return None
        return (self.tables8, self.table_step) if _INT8_TABLES_APPLY() else None

    def linear(self, x: torch.Tensor, delta: LowRankUpdate | None = None) -> torch.Tensor:
        """`x Wᵀ`, plus `delta(x)` (an adapter), which the native kernel adds itself if it can."""
        plan = self.native_product(x, delta)
        if plan is None:
            dtype = _compute_dtype(x)
            return _plus(F.linear(x.to(dtype), self.dequantize(dtype)), delta, x)
        args, lora, tables8 = plan
        y = kernels.lut_linear(x.float(), *args, lora=lora, int8_tables=tables8)
        return finish_native(y, x, delta, lora)

    def storage_bits(self) -> int:
        """Bits stored on disk: indices, tables and scales."""
        scale_bits = 0 if self.scale is None else _buffer_bits_of(self.scale)
        return (
            self.out_features * self.in_features * self.bits
            + _buffer_bits_of(self.lut)
            + scale_bits
        )

    def memory_bytes(self) -> int:
        """Bytes held in memory now (the kernels' layout once repacked)."""
        return _buffer_bits(self) // 8


class Int8Rows(nn.Module):
    """A matrix `(rows, cols)` stored as int8 with one float scale per row (symmetric)."""

    def __init__(self, values: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("values", values)
        self.register_buffer("scale", scale)
        self.register_buffer("scale32", None, persistent=False)  # for the native kernel
        self.dense_cache: torch.Tensor | None = None  # see `dense_copies`

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Rows:
        amax = weight.abs().amax(dim=1).clamp(min=1e-12)
        scale = (amax / 127).to(torch.float16)
        values = torch.round(weight / scale.float().unsqueeze(1)).clamp(-127, 127)
        return cls(values.to(torch.int8), scale)

    @property
    def in_features(self) -> int:
        return self.values.shape[1]

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized rows `ids` (the embedding lookup)."""
        return self.values[ids].to(dtype) * self.scale[ids].to(dtype).unsqueeze(-1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.dense_cache is not None and self.dense_cache.dtype == dtype:
            return self.dense_cache
        return self.values.to(dtype) * self.scale.to(dtype).unsqueeze(1)

    def linear(self, x: torch.Tensor, delta: LowRankUpdate | None = None) -> torch.Tensor:
        """`x Vᵀ · scale` (plus `delta(x)`, an adapter, if given)."""
        return _plus(self._product(x), delta, x)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        rows = _kernel_rows(x) if self.dense_cache is None else None
        if rows is not None and rows <= kernels.MAX_KERNEL_ROWS:
            if self.scale32 is None:
                self.scale32 = self.scale.float().contiguous()
            return kernels.int8_linear(x.float(), self.values.contiguous(), self.scale32).to(dtype)
        x = x.to(dtype)
        if self.dense_cache is not None and self.dense_cache.dtype == x.dtype:
            return F.linear(x, self.dense_cache)
        if _WEIGHT_INT8_MM is not None and x.device.type == "cpu" and not x.requires_grad:
            flat = x.reshape(-1, x.shape[-1])
            if x.dtype not in (torch.bfloat16, torch.float32):
                flat = flat.float()
            if self.values.data_ptr() % _KERNEL_ALIGNMENT:
                # memory-mapped from a file at an odd offset: the kernel's bf16 path would
                # crash on it, so move the rows once into memory the allocator aligns
                self.values = self.values.clone()
            y = _WEIGHT_INT8_MM(flat.contiguous(), self.values, self.scale.to(flat.dtype))
            return y.view(*x.shape[:-1], -1).to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype))

    def storage_bits(self) -> int:
        return _buffer_bits_of(self.values) + _buffer_bits_of(self.scale)


def repack_for_kernels(model: nn.Module) -> None:
    """Move every palettized weight into the native kernels' layout now (at load), so the first
    request does not pay for it; nothing happens without the native kernels."""
    if kernels.native():
        for module in model.modules():
            if isinstance(module, PalettizedWeight) and module.bits in kernels.SUPPORTED_BITS:
                module.repack()


def is_compressed(model: nn.Module) -> bool:
    """Whether any projection of `model` computes with a compressed weight."""
    return any(isinstance(m, (PalettizedWeight, Int8Rows)) for m in model.modules())


@contextmanager
def dense_copies(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Inside the block, compressed weights compute from a dense `dtype` copy made once.

    For training on a frozen compressed model (the recovery adapter): rebuilding every weight
    in every step would dominate the step. The copies go away on leaving the block, and the
    state dict never sees them.
    """
    weights = [m for m in model.modules() if isinstance(m, (PalettizedWeight, Int8Rows))]
    try:
        for weight in weights:
            weight.dense_cache = None
            weight.dense_cache = weight.dequantize(dtype)
        yield
    finally:
        for weight in weights:
            weight.dense_cache = None


class Int8Embedding(nn.Module):
    """An embedding table held as `Int8Rows` (the output head may share the same rows)."""

    def __init__(self, table: Int8Rows, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.table = table
        self.dtype = dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.rows(tokens, self.dtype)
