"""The native kernels against their PyTorch references, under every instruction set this CPU has."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from openafm import kernels
from openafm.kernels import reference
from openafm.model.compressed import Int8Rows, PalettizedWeight, pack_indices

ISAS = kernels.supported_isas()
needs_native = pytest.mark.skipif(not ISAS, reason="no native kernels (no compiler here)")
# rows: not multiples of the 4-row tile; columns: not multiples of the 32-column block
SHAPES = [(4, 32), (12, 40), (20, 100), (64, 576), (36, 1000)]
ROWS = [1, 2, 3, 4, 5, 7, 8, 13, 16]


def _palettized(out: int, cols: int, bits: int, group: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, 1 << bits, (out, cols), generator=gen)
    tables = torch.randn(out // group, 1 << bits, generator=gen)
    scale = torch.rand(out, generator=gen) + 0.5
    return indices, kernels.repack(indices, bits), tables.flatten(), scale


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    assert got.shape == want.shape
    assert (got - want).abs().max() <= rel * max(1.0, want.abs().max().item())


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(kernels.SUPPORTED_BITS),
    rows=st.integers(1, 23),
    cols=st.integers(1, 130),
    seed=st.integers(0, 2**16),
)
def test_repacked_planes_round_trip_and_take_bits_per_index(bits, rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, 1 << bits, (rows, cols), generator=gen)
    planes = kernels.repack(indices, bits)
    assert planes.dtype == torch.uint8 and planes.numel() == kernels.planes_nbytes(rows, cols, bits)
    assert torch.equal(kernels.unpack(planes, bits, rows, cols), indices)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", kernels.SUPPORTED_BITS)
def test_lookup_table_products_equal_the_reference(isa, bits):
    for (out, cols), group in zip(SHAPES, [4, 4, 2, 16, 1], strict=True):
        _, planes, tables, scale = _palettized(out, cols, bits, group)
        for m in ROWS:
            x = torch.randn(m, cols)
            for s in (scale, None):
                want = reference.lut_linear(x, planes, tables, s, bits, group, out)
                got = kernels.lut_linear(x, planes, tables, s, bits, group, out, isa=isa)
                _close(got, want)
        dense = kernels.lut_dequantize(planes, tables, scale, bits, group, out, cols, isa=isa)
        assert torch.equal(
            dense, reference.lut_dequantize(planes, tables, scale, bits, group, out, cols)
        )


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_int8_table_products_equal_their_reference_where_the_cpu_runs_them(isa):
    """With int8 tables, 4-bit products equal the reference's int8-table semantics (tables
    rounded per group, activations rounded to int16 per row) where the CPU has the integer
    kernel, and the float tables' result elsewhere; other widths ignore them."""
    uses = kernels.int8_tables_apply(isa)
    for (out, cols), group in zip(SHAPES, [4, 4, 2, 16, 1], strict=True):
        _, planes, tables, scale = _palettized(out, cols, 4, group)
        t8 = kernels.int8_tables(tables, 4)
        for m in ROWS:
            x = torch.randn(m, cols)
            want = reference.lut_linear(
                x, planes, tables, scale, 4, group, out, int8_tables=t8 if uses else None
            )
            got = kernels.lut_linear(
                x, planes, tables, scale, 4, group, out, int8_tables=t8, isa=isa
            )
            _close(got, want)
    # int8 tables round each entry to 1/127 of the group's largest: a small, bounded change
    x = torch.randn(3, 1000)
    _, planes, tables, scale = _palettized(36, 1000, 4, 4)
    t8 = kernels.int8_tables(tables, 4)
    exact = reference.lut_linear(x, planes, tables, scale, 4, 4, 36)
    rounded = reference.lut_linear(x, planes, tables, scale, 4, 4, 36, int8_tables=t8)
    assert 0 < (rounded - exact).abs().max() < 0.02 * exact.abs().max()


@needs_native
def test_int8_tables_are_refused_when_they_do_not_fit():
    _, planes, tables, scale = _palettized(36, 100, 4, 4)
    t8, step = kernels.int8_tables(tables, 4)
    if not kernels.int8_tables_apply():
        pytest.skip("this CPU computes with the float tables")
    with pytest.raises(RuntimeError, match="int8 tables must be"):
        kernels.lut_linear(
            torch.randn(1, 100), planes, tables, scale, 4, 4, 36, int8_tables=(t8[:-16], step)
        )


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_the_fused_low_rank_update_equals_two_products(isa):
    _, planes, tables, scale = _palettized(36, 100, 4, 4)
    a, b = torch.randn(16, 100), torch.randn(36, 16)
    for m in (1, 3, 16):
        x = torch.randn(2, m, 100)  # leading dimensions are kept
        want = reference.lut_linear(x, planes, tables, scale, 4, 4, 36)
        want = want + reference.low_rank(x, a, b, 0.5)
        for layout in (b, b.t().contiguous().t()):  # B row-major or column-major
            lora = (a, layout, 0.5)
            _close(kernels.lut_linear(x, planes, tables, scale, 4, 4, 36, lora=lora, isa=isa), want)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_bfloat16_factors_give_the_update_of_their_float32_values(isa):
    _, planes, tables, scale = _palettized(36, 100, 4, 4)
    a, b = torch.randn(16, 100).bfloat16(), torch.randn(36, 16).bfloat16()
    x = torch.randn(3, 100)
    for layout in (b, b.t().contiguous().t()):
        widened = (a.float(), layout.float(), 0.5)  # the same layout, float32
        want = kernels.lut_linear(x, planes, tables, scale, 4, 4, 36, lora=widened, isa=isa)
        got = kernels.lut_linear(x, planes, tables, scale, 4, 4, 36, lora=(a, layout, 0.5), isa=isa)
        _close(got, want)
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        kernels.lut_linear(x, planes, tables, scale, 4, 4, 36, lora=(a, b.float(), 0.5), isa=isa)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_int8_rows_equal_the_reference_exactly_or_within_int16_rounding(isa):
    gen = torch.Generator().manual_seed(0)
    for out, cols in [(13, 50), (64, 576), (40, 24), (100, 1000)]:
        values = torch.randint(-127, 128, (out, cols), dtype=torch.int8, generator=gen)
        scale = torch.rand(out, generator=gen)
        for m in (1, 2, 5, 16):
            x = torch.randn(m, cols, generator=gen)
            want = reference.int8_linear(x, values, scale)
            with kernels.using("exact"):
                _close(kernels.int8_linear(x, values, scale, isa=isa), want)
            with kernels.using("default"):
                _close(kernels.int8_linear(x, values, scale, isa=isa), want, rel=2**-13)


@needs_native
def test_the_int16_head_sums_the_same_integers_with_avx2_and_avx512():
    if not {"avx2", "avx512"} <= set(ISAS):
        pytest.skip("this CPU lacks AVX-512")
    gen = torch.Generator().manual_seed(1)
    for out, cols in [(13, 50), (64, 576), (100, 1000)]:
        values = torch.randint(-127, 128, (out, cols), dtype=torch.int8, generator=gen)
        scale = torch.rand(out, generator=gen)
        for m in (1, 2, 3):
            x = torch.randn(m, cols, generator=gen) * 10
            with kernels.using("default"):
                got = [kernels.int8_linear(x, values, scale, isa=isa) for isa in ("avx2", "avx512")]
            assert torch.equal(*got)


@needs_native
def test_rms_norm_equals_pytorch():
    x, w = torch.randn(3, 5, 577), torch.randn(577)
    _close(kernels.rms_norm(x, w, 1e-5), F.rms_norm(x, (577,), w, 1e-5))


@needs_native
def test_palettized_weight_computes_with_the_kernel_and_saves_its_on_disk_form():
    indices, _, tables, scale = _palettized(48, 64, 3, 16)
    packed = pack_indices(indices, 3)
    pw = PalettizedWeight(
        packed, tables.view(3, 8).half(), scale.half(), bits=3, group_size=16, in_features=64
    )
    x = torch.randn(5, 64)
    with kernels.using("reference"):
        want = pw.linear(x)
    assert not pw.repacked
    with kernels.using("exact"):
        got = pw.linear(x)
    assert pw.repacked and pw.indices.numel() == 0  # no second copy of the indices
    _close(got, want)
    assert torch.equal(pw.state_dict()["indices"], packed)
    assert pw.storage_bits() == 48 * 64 * 3 + 3 * 8 * 16 + 48 * 16
    with kernels.using("reference"):  # the reference path reads the repacked form too
        _close(pw.linear(x), want)
    fresh = PalettizedWeight(
        torch.zeros_like(packed),
        tables.view(3, 8).half(),
        torch.ones(48).half(),
        bits=3,
        group_size=16,
        in_features=64,
    )
    fresh.repack()
    fresh.load_state_dict(pw.state_dict())  # loading replaces the repacked form
    with kernels.using("exact"):
        _close(fresh.linear(x), want)


def test_unsupported_widths_and_bad_planes_fall_back_or_fail_clearly():
    indices = torch.randint(0, 32, (16, 64))
    pw = PalettizedWeight(
        pack_indices(indices, 5),
        torch.randn(1, 32).half(),
        None,
        bits=5,
        group_size=16,
        in_features=64,
    )
    x = torch.randn(1, 64)
    _close(pw.linear(x), x @ pw.dequantize().T)  # 5 bits: the PyTorch path
    assert not pw.repacked
    with pytest.raises(ValueError, match="bits"):
        kernels.repack(indices, 5)
    if ISAS:
        _, planes, tables, scale = _palettized(16, 64, 4, 16)
        with pytest.raises(RuntimeError, match="planes hold"):
            kernels.lut_linear(x, planes[:-1], tables, scale, 4, 16, 16)
        with pytest.raises(RuntimeError, match="unsupported bit width"):
            kernels.lut_linear(x, planes, tables, scale, 5, 16, 16)
        with pytest.raises(RuntimeError, match="tables"):
            kernels.lut_linear(x, planes, tables[:-1], scale, 4, 16, 16)


def test_int8_rows_kernel_serves_the_head_and_keeps_autograd_on_pytorch():
    rows = Int8Rows.quantize(torch.randn(40, 24))
    x = torch.randn(2, 24, requires_grad=True)
    y = rows.linear(x)  # training: the PyTorch path, with a gradient
    y.sum().backward()
    assert x.grad is not None


def _run_isolated(home: Path, env: dict[str, str], code: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "OPENAFM_HOME": str(home), **env}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=600
    )


PROBE = (
    "import logging, torch; logging.basicConfig(format='%(message)s'); torch.manual_seed(0);"
    "from openafm import kernels;"
    "print(kernels.mode(), kernels.isa());"
    "x = torch.randn(1, 64); i = torch.randint(0, 16, (8, 64)); t = torch.randn(32);"
    "print(float(kernels.lut_linear(x, kernels.repack(i, 4), t, None, 4, 4, 8).sum()))"
)


def test_without_a_compiler_one_warning_and_the_reference_path(tmp_path):
    done = _run_isolated(tmp_path, {"CXX": "/bin/false", "CC": "/bin/false"}, PROBE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "reference none"
    warnings = [line for line in done.stderr.splitlines() if "native kernels unavailable" in line]
    assert len(warnings) == 1 and "Traceback" not in done.stderr


@needs_native
def test_a_damaged_cached_library_is_rebuilt(tmp_path):
    first = _run_isolated(tmp_path, {}, PROBE)
    assert first.returncode == 0 and first.stdout.startswith("default"), first.stderr
    (library,) = (tmp_path / "kernels").glob("*/*.so")
    library.write_bytes(b"not a shared library")
    second = _run_isolated(tmp_path, {}, PROBE)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert "rebuilding the native kernels" in second.stderr


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_several_weights_in_one_call_equal_one_call_each(isa):
    weights, loras = [], []
    for i, (out, bits, group) in enumerate([(36, 2, 4), (12, 6, 4), (20, 3, 2), (64, 4, 16)]):
        _, planes, tables, scale = _palettized(out, 100, bits, group, seed=i)
        weights.append((planes, tables, scale if i % 2 else None, bits, group, out))
        loras.append((torch.randn(8, 100), torch.randn(out, 8), 0.25) if i < 2 else None)
    for m in (1, 5):
        x = torch.randn(m, 100)
        many = kernels.lut_linear_many(x, weights, loras, isa=isa)
        for y, w, lora in zip(many, weights, loras, strict=True):
            assert torch.equal(y, kernels.lut_linear(x, *w, lora=lora, isa=isa))


@needs_native
def test_rotary_embedding_is_bit_identical_to_pytorch():
    x = torch.randn(2, 7, 5, 64).transpose(1, 2)  # as attention makes it: not contiguous
    for cos, sin in [(torch.randn(7, 64), torch.randn(7, 64)), (torch.randn(2, 1, 7, 64),) * 2]:
        assert torch.equal(kernels.rope(x, cos, sin), reference.rope(x, cos, sin))


def test_projections_fused_or_not_give_the_same_outputs(tmp_path):
    from openafm.model import Linear
    from openafm.model.linear import LowRankDelta, project

    gen = torch.Generator().manual_seed(0)
    layers = []
    for out, bits in [(48, 4), (16, 2), (32, 6)]:
        layer = Linear(64, out)
        indices = torch.randint(0, 1 << bits, (out, 64), generator=gen)
        tables = torch.randn(out // 16, 1 << bits, generator=gen).half()
        layer.compress(
            PalettizedWeight(
                pack_indices(indices, bits), tables, None, bits=bits, group_size=16, in_features=64
            )
        )
        layers.append(layer)
    layers[0].delta = LowRankDelta(
        torch.randn(4, 64, generator=gen), torch.randn(48, 4, generator=gen)
    )
    x = torch.randn(1, 3, 64, generator=gen)
    with torch.inference_mode():
        pairs = []
        for mode in ("default", "fast"):
            with kernels.using(mode):
                pairs.append((project(x, *layers), [layer(x) for layer in layers]))
        with kernels.using("exact"):
            fused = project(x, *layers)
        with kernels.using("reference"):
            pairs.append((fused, project(x, *layers)))
    for fused, separate in pairs:
        for a, b in zip(fused, separate, strict=True):
            _close(a, b)
