"""Recovery adapter, int8 KV cache and activations, Core ML export, and the CLI, on a tiny model."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from openafm.adapters.trainer import TrainConfig
from openafm.compress.activations import fake_quantize_per_token, int8_activations
from openafm.compress.calibration import text_windows
from openafm.compress.coreml_export import export_coreml
from openafm.compress.pipeline import DEFAULT_CALIBRATION, CompressConfig, compress_model
from openafm.compress.recovery import (
    RecoveryConfig,
    RecoveryDataError,
    distillation_loss,
    token_windows,
    train_recovery,
)
from openafm.eval.quality import compare_models
from openafm.model import KVCache
from tests.conftest import byte_tokenizer, make_tiny


def _compressed(bits=(2,), target=2.5):
    teacher, tokenizer = make_tiny(), byte_tokenizer()
    teacher.requires_grad_(False)
    student = copy.deepcopy(teacher)
    config = CompressConfig(target_bpw=target, bit_widths=bits, calibration_tokens=2048, window=128)
    compress_model(student, tokenizer, DEFAULT_CALIBRATION, config)
    return student, teacher, tokenizer


def test_distillation_loss_is_the_kl_divergence_from_the_teacher():
    student, teacher, _ = _compressed()
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    loss, n = distillation_loss(teacher)(student, tokens, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = torch.log_softmax(teacher(tokens).float(), -1)[:, :-1]
        q = torch.log_softmax(student(tokens).float(), -1)[:, :-1]
    by_hand = (p.exp() * (p - q)).sum()
    assert n == 2 * 23
    assert float(loss) == pytest.approx(float(by_hand), rel=2e-2)
    assert float(distillation_loss(teacher)(teacher, tokens, labels)[0]) == pytest.approx(
        0, abs=1e-3
    )


def test_recovery_adapter_brings_the_compressed_model_closer(tmp_path):
    student, teacher, tokenizer = _compressed()
    windows, checksum = token_windows(tokenizer, [DEFAULT_CALIBRATION], 64)
    train, held = windows[:-8], windows[-8:]
    probe = text_windows(tokenizer, DEFAULT_CALIBRATION, window=64)[-8:]
    before = compare_models(student, teacher, probe).kld_mean
    config = TrainConfig(steps=40, lr=3e-3, batch_size=8, warmup_steps=4, eval_every=20)
    _, result = train_recovery(
        student,
        teacher,
        train,
        tmp_path / "run",
        RecoveryConfig(rank=4, alpha=8, seq_len=64),
        config,
        pad_id=257,
        data_checksum=checksum,
        eval_examples=held,
    )
    after = compare_models(student, teacher, probe).kld_mean
    assert after < 0.7 * before
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == list(range(1, 41))
    assert metrics[-1]["eval_loss"] < metrics[19]["eval_loss"]
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    assert result.tokens == 40 * 8 * 64


def test_recovery_data_errors_are_clear(tmp_path):
    tokenizer = byte_tokenizer()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"other": 1}\n')
    with pytest.raises(RecoveryDataError, match=r"bad\.jsonl:2: a record holds no text"):
        token_windows(tokenizer, [bad], 4)
    with pytest.raises(RecoveryDataError, match="not found"):
        token_windows(tokenizer, [tmp_path / "missing.txt"], 4)
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(RecoveryDataError, match="fewer than one window"):
        token_windows(tokenizer, [short], 64)


def test_int8_kv_cache_reads_back_within_rounding():
    cache = KVCache(1, 2, 16, dtype=torch.int8)
    k = torch.randn(2, 2, 5, 8)
    v = torch.randn(2, 2, 5, 8)
    keys, values = cache.write(0, k, v)
    step = k.abs().amax(-1, keepdim=True) / 127
    assert keys.dtype == torch.float32
    assert torch.all((keys - k).abs() <= step * 0.51 + 1e-3)
    assert torch.all((values - v).abs() <= v.abs().amax(-1, keepdim=True) / 127 * 0.51 + 1e-3)
    assert cache.nbytes() < KVCache(1, 2, 16).nbytes() + 4 * 2 * 16 * 2 * 8 * 4


def test_int8_kv_and_activations_cost_little_on_a_tiny_model():
    model, tokenizer = make_tiny(), byte_tokenizer()
    windows = text_windows(tokenizer, DEFAULT_CALIBRATION, window=64, max_tokens=512)
    kv = compare_models(model, model, windows, kv_dtype=torch.int8)
    assert 0 < kv.kld_mean < 1e-3
    quantized = copy.deepcopy(model)
    with int8_activations(quantized):
        act = compare_models(quantized, model, windows)
    assert 0 < act.kld_mean < 1e-2
    x = torch.randn(3, 10)
    assert torch.allclose(fake_quantize_per_token(x), x, atol=float(x.abs().max()) / 127)


def test_coreml_package_keeps_palettized_weights(tmp_path):
    pytest.importorskip("coremltools")
    student, _, _ = _compressed(bits=(2, 4), target=3.5)
    summary = export_coreml(student, tmp_path / "tiny.mlpackage", seq_len=16)
    projections = 2 * 7
    assert summary.lut_ops == projections
    assert summary.int8_ops >= 1  # the 8-bit embedding (and per-row scales)
    dense_fp16 = sum(p.numel() for p in make_tiny().parameters()) * 2
    assert 0 < summary.weight_bytes < 0.5 * dense_fp16
    assert (tmp_path / "tiny.mlpackage" / "Manifest.json").exists()
