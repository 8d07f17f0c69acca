"""Palettization, bit allocation, the compressed format and the quality report, on a tiny model."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openafm import kernels
from openafm.compress.allocate import AllocationError, OperationCost, allocate_bits
from openafm.compress.calibration import CalibrationError, input_hessians, text_windows
from openafm.compress.palettize import PalettizeConfig, palettize, weighted_kmeans_1d
from openafm.compress.pipeline import DEFAULT_CALIBRATION, CompressConfig, compress_model
from openafm.eval.quality import compare_models
from openafm.io import model_signature
from openafm.io.compressed_checkpoint import (
    CompressedModelError,
    bits_summary,
    load_compressed,
    save_compressed,
)
from openafm.model.compressed import Int8Rows, pack_indices, unpack_indices
from openafm.model.linear import Linear
from tests.conftest import TINY_COMPRESS, byte_tokenizer, make_tiny

CALIBRATION = DEFAULT_CALIBRATION


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([1, 2, 3, 4, 6, 8]),
    rows=st.integers(1, 5),
    chunks=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_packing_round_trips_and_takes_exactly_bits_per_index(bits, rows, chunks, seed):
    n = 8 * chunks
    idx = torch.randint(0, 1 << bits, (rows, n), generator=torch.Generator().manual_seed(seed))
    packed = pack_indices(idx, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() * 8 == idx.numel() * bits
    assert torch.equal(unpack_indices(packed, bits), idx)


def test_four_bit_nibbles_are_low_first():
    packed = pack_indices(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]]), 4)
    assert packed.tolist() == [[0x21, 0x43, 0x65, 0xF7]]


@pytest.mark.parametrize("error_feedback", [False, True])
def test_four_bits_are_exact_for_groups_of_at_most_sixteen_values(error_feedback):
    gen = torch.Generator().manual_seed(0)
    levels = torch.randn(4, 16, generator=gen)  # 4 groups, 16 distinct values each
    pick = torch.randint(0, 16, (64, 96), generator=gen)
    weight = levels.repeat_interleave(16, dim=0).gather(1, pick).to(torch.float16).float()
    x = torch.randn(256, 96, generator=gen)
    config = PalettizeConfig(bits=4, group_size=16, row_scale=False, error_feedback=error_feedback)
    pw = palettize(weight, config, x.T @ x)
    assert torch.equal(pw.dequantize(), weight)


def test_kmeans_is_close_to_coremltools_optimal_kmeans():
    """Our 1-D k-means (Linde-Buzo-Gray, fast) against coremltools' post-training palettizer,
    whose 1-D k-means is exact (dynamic programming, about 30 ms per group of 9,216 values:
    too slow for every width of every projection): within 10% of the optimal squared error."""
    ct = pytest.importorskip("coremltools.optimize.torch.palettization")
    layer = torch.nn.Linear(96, 64, bias=False)
    torch.manual_seed(0)
    torch.nn.init.normal_(layer.weight)
    reference = copy.deepcopy(layer)
    config = ct.PostTrainingPalettizerConfig.from_dict(
        {
            "global_config": {
                "n_bits": 4,
                "granularity": "per_grouped_channel",
                "group_size": 16,
            }
        }
    )
    theirs = ct.PostTrainingPalettizer(reference, config).compress().weight.detach()
    ours = palettize(layer.weight, PalettizeConfig(bits=4, row_scale=False, error_feedback=False))
    w = layer.weight.detach()
    err_ours = float(((ours.dequantize() - w) ** 2).sum())
    err_theirs = float(((theirs - w) ** 2).sum())
    assert err_theirs <= err_ours <= err_theirs * 1.10


def test_kmeans_is_deterministic_and_sorted():
    values = torch.randn(3, 500, generator=torch.Generator().manual_seed(1))
    a = weighted_kmeans_1d(values, None, 8)
    assert torch.equal(a, weighted_kmeans_1d(values, None, 8))
    assert torch.all(a[:, 1:] >= a[:, :-1])


def test_error_feedback_lowers_the_output_error_on_calibration_inputs():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(32, 64, generator=gen)
    mixing = torch.randn(16, 64, generator=gen)  # correlated channels, as real inputs are
    x = torch.randn(512, 16, generator=gen) @ mixing + 0.1 * torch.randn(512, 64, generator=gen)
    h = x.T @ x
    errors = {}
    for feedback in (False, True):
        pw = palettize(weight, PalettizeConfig(bits=3, error_feedback=feedback), h)
        errors[feedback] = float(((x @ (pw.dequantize() - weight).T) ** 2).sum())
    assert errors[True] < 0.8 * errors[False]


def test_bits_per_weight_counts_indices_tables_and_scales():
    weight = torch.randn(48, 64)
    for bits, scale in [(2, False), (3, True), (4, True)]:
        config = PalettizeConfig(bits=bits, row_scale=scale, error_feedback=False)
        pw = palettize(weight, config)
        expected = bits * 48 * 64 + 3 * (1 << bits) * 16 + (48 * 16 if scale else 0)
        assert pw.storage_bits() == expected
        assert config.bits_per_weight(48, 64) == pytest.approx(expected / (48 * 64))


def test_int8_rows_round_within_half_a_step():
    weight = torch.randn(40, 24)
    rows = Int8Rows.quantize(weight)
    step = rows.scale.float().unsqueeze(1)
    assert torch.all((rows.dequantize() - weight).abs() <= step / 2 + 1e-6)
    x = torch.randn(3, 24)
    exact = x @ rows.dequantize().T
    for mode in kernels.MODES:
        with kernels.using(mode):
            # default and fast round the activations to int16: within 2^-13 of the largest
            tolerance = 2**-13 * exact.abs().max() if mode in ("default", "fast") else 1e-4
            assert torch.allclose(rows.linear(x), exact, atol=tolerance)


def test_int8_rows_at_an_odd_address_multiply_under_bf16_autocast():
    """A weight memory-mapped from a file can start at any byte: the bf16 kernel must not see it."""
    rows = Int8Rows.quantize(torch.randn(512, 64))
    backing = torch.empty(rows.values.numel() + 64, dtype=torch.int8)
    start = 40 - backing.data_ptr() % 64 + (64 if backing.data_ptr() % 64 > 40 else 0)
    odd = backing[start : start + rows.values.numel()].view(512, 64)
    odd.copy_(rows.values)
    assert odd.data_ptr() % 64 == 40
    rows.values = odd
    x = torch.randn(300, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rows.linear(x)
    expected = x @ rows.dequantize().T
    assert torch.allclose(y.float(), expected, atol=0.05 * expected.abs().max().item())


def _compressed_tiny(tmp_path: Path, bit_widths=(2, 4), target=3.5):
    model, tokenizer = make_tiny(), byte_tokenizer()
    config = replace(TINY_COMPRESS, target_bpw=target, bit_widths=bit_widths)
    result = compress_model(model, tokenizer, CALIBRATION, config)
    return result, tokenizer


def test_compress_meets_the_budget_drops_dense_weights_and_is_deterministic(tmp_path):
    first, _ = _compressed_tiny(tmp_path)
    second, _ = _compressed_tiny(tmp_path)
    summary = bits_summary(first.model)
    assert summary["bpw"] <= 3.5
    assert set(first.bits.values()) <= {2, 4}
    for module in first.model.modules():
        if isinstance(module, Linear):
            assert module.weight is None and module.compressed is not None
    sig = model_signature(first.model.config, first.model.state_dict())
    assert sig == model_signature(second.model.config, second.model.state_dict())
    # sensitivities of 2 bits are measured above those of 4 bits for every projection
    by = {(c.name, c.bits): c.sensitivity for c in first.costs}
    assert sum(by[n, 2] for n in first.bits) > sum(by[n, 4] for n in first.bits)


def test_compressed_model_round_trips_through_its_directory(tmp_path):
    result, _ = _compressed_tiny(tmp_path)
    out = save_compressed(result.model, tmp_path / "m", made_with={"test": True})
    loaded = load_compressed(out)
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(tokens), result.model(tokens))
    meta = json.loads((out / "compression.json").read_text())
    assert meta["bpw"] == pytest.approx(bits_summary(result.model)["bpw"])
    assert set(meta["tensors"]) == set(result.bits)

    weights = out / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CompressedModelError, match="checksum"):
        load_compressed(out)
    weights.unlink()
    with pytest.raises(CompressedModelError, match="missing"):
        load_compressed(out)


def test_a_directory_with_wrongly_sized_indices_or_tables_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from openafm.files import sha256_file

    result, _ = _compressed_tiny(tmp_path)
    out = save_compressed(result.model, tmp_path / "m", made_with={"test": True})
    weights, meta_path = out / "weights.safetensors", out / "compression.json"
    original = load_file(weights)
    name = next(n for n in original if n.endswith("compressed.indices"))
    for key, bad in [
        (name, original[name][:, :-1]),  # a packed row too short
        (name.replace("indices", "lut"), original[name.replace("indices", "lut")][:, :-1]),
    ]:
        save_file({**original, key: bad.contiguous()}, weights)
        meta = json.loads(meta_path.read_text())
        meta["weights_sha256"] = sha256_file(weights)  # consistent, but the shapes are wrong
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(CompressedModelError, match="do not fit"):
            load_compressed(out)


def test_bits_summary_counts_the_embedding_in_the_total(tmp_path):
    result, _ = _compressed_tiny(tmp_path, bit_widths=(4,), target=5.0)
    s = bits_summary(result.model)
    config = result.model.config
    linear = s["projection_weights"]
    embed_weights = config.vocab_size * config.dim
    assert s["total_weights"] > linear + embed_weights - 1
    norms_bits = sum(
        p.numel() * 32 for n, p in result.model.named_parameters() if n.endswith("norm.weight")
    )
    expected = s["bpw"] * linear + embed_weights * 8 + config.vocab_size * 16 + norms_bits
    assert s["bpw_total"] == pytest.approx(expected / s["total_weights"])


def test_bad_inputs_fail_with_one_clear_error(tmp_path):
    model, tokenizer = make_tiny(), byte_tokenizer()
    with pytest.raises(ValueError, match="cannot be met"):
        compress_model(model, tokenizer, CALIBRATION, CompressConfig(target_bpw=1.5))
    with pytest.raises(ValueError, match="does not divide"):
        config = CompressConfig(palettize=replace(PalettizeConfig(), group_size=24))
        compress_model(model, tokenizer, CALIBRATION, config)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CalibrationError, match="empty"):
        compress_model(model, tokenizer, empty, CompressConfig())
    with pytest.raises(CalibrationError, match="not found"):
        compress_model(model, tokenizer, tmp_path / "nope.txt", CompressConfig())
    with pytest.raises(ValueError, match="bits must be"):
        PalettizeConfig(bits=5)


def test_allocation_meets_the_budget_at_least_sensitivity():
    def cost(name, bits, sens):
        return OperationCost(name, bits, 1000, bits * 1000, sens, 0.0)

    costs = [
        cost("a", 4, 0.01),
        cost("a", 2, 0.50),  # a is sensitive
        cost("b", 4, 0.01),
        cost("b", 2, 0.02),
    ]
    assert allocate_bits(costs, 3.0) == {"a": 4, "b": 2}
    assert allocate_bits(costs, 4.0) == {"a": 4, "b": 4}
    with pytest.raises(AllocationError, match="below"):
        allocate_bits(costs, 1.5)


def test_quality_report_of_a_model_against_itself_is_perfect():
    model, tokenizer = make_tiny(), byte_tokenizer()
    windows = text_windows(tokenizer, CALIBRATION, window=64, max_tokens=256)
    report = compare_models(model, model, windows)
    assert report.kld_mean == pytest.approx(0, abs=1e-6)
    assert report.ppl_ratio == pytest.approx(1.0)
    assert report.top1_agreement == 1.0
    assert report.tokens == len(windows) * 31


def test_hessians_are_shared_by_projections_reading_one_input():
    model, tokenizer = make_tiny(), byte_tokenizer()
    windows = text_windows(tokenizer, CALIBRATION, window=32, max_tokens=64)
    h = input_hessians(model, windows)
    assert h["layers.0.attn.q"] is h["layers.0.attn.k"] is h["layers.0.attn.v"]
    assert h["layers.1.mlp.gate"] is h["layers.1.mlp.up"]
    assert h["layers.1.mlp.down"].shape == (128, 128)
    assert torch.allclose(h["layers.0.attn.q"], h["layers.0.attn.q"].T)


def test_affine_baseline_is_exact_on_its_own_grid_and_counts_its_constants():
    from openafm.compress.affine import affine_bits_per_weight, affine_round_to_nearest

    gen = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (8, 64), generator=gen).float()
    low = torch.randn(8, 2, 1, generator=gen).to(torch.float16).float()
    step = (torch.rand(8, 2, 1, generator=gen) + 0.5).to(torch.float16).float()
    q[:, ::32] = 0  # every block spans the full grid, so its min and step are recovered
    q[:, 1::32] = 15
    weight = (q.view(8, 2, 32) * step + low).view(8, 64)
    assert torch.allclose(affine_round_to_nearest(weight, 4, 32), weight, atol=1e-3)
    assert affine_bits_per_weight(4, 32) == 5.0
    coarse = affine_round_to_nearest(weight, 2, 32)
    assert (coarse - weight).abs().max() <= step.max() * 15 / 3 / 2 + 1e-3
