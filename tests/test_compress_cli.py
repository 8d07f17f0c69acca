"""`afm compress`, `afm eval quality`, `afm recover`, `afm generate` and `afm export coreml`
end to end on a tiny model directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openafm.compress.pipeline import DEFAULT_CALIBRATION
from tests.test_cli import afm


@pytest.fixture(scope="module")
def compressed_dir(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("c") / "tiny-3.5"
    run = afm(
        "compress", "--model", str(tiny_dir), "--out", str(out), "--bpw", "3.5",
        "--bits", "2,4", "--calibration-tokens", "1024", "--json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr.decode()
    report = json.loads(run.stdout)
    assert report["bpw"] <= 3.5
    assert len(report["projections"]) == 14
    assert {row["bits"] for row in report["projections"]} <= {2, 4}
    return out


def test_compress_writes_the_format_and_its_report(compressed_dir):
    meta = json.loads((compressed_dir / "compression.json").read_text())
    allocation = json.loads((compressed_dir / "allocation.json").read_text())
    assert meta["embedding"] == "int8"
    assert len(meta["tensors"]) == 14
    assert len(allocation["candidates"]) == 28  # every projection measured at 2 and 4 bits
    shares = [row["latency_share"] for row in allocation["projections"]]
    assert sum(shares) == pytest.approx(1.0)
    assert {"tokenizer.json", "config.json", "weights.safetensors"} <= {
        p.name for p in compressed_dir.iterdir()
    }


def test_quality_recover_generate_and_export(compressed_dir, tiny_dir, tmp_path):
    quality = ["eval", "quality", "--model", str(compressed_dir), "--reference", str(tiny_dir)]
    quality += ["--data", str(DEFAULT_CALIBRATION), "--tokens", "512", "--window", "128"]
    before = afm(*quality, "--json")
    assert before.returncode == 0, before.stderr.decode()
    report = json.loads(before.stdout)
    for key in ("ppl", "ppl_reference", "ppl_ratio", "kld_mean", "kld_p99", "top1_agreement"):
        assert report[key] > 0
    assert report["bpw"] <= 3.5 < report["bpw_total"] < 9
    assert report["recovery_adapter"] is False

    recover = afm(
        "recover", "--model", str(compressed_dir), "--data", str(DEFAULT_CALIBRATION),
        "--steps", "30", "--rank", "4", "--seq-len", "64", "--lr", "3e-3", "--holdout", "4",
        "--eval-every", "15",
    )  # fmt: skip
    assert recover.returncode == 0, recover.stderr.decode()
    record = json.loads((compressed_dir / "recovery" / "adapter.json").read_text())
    assert record["role"] == "accuracy-recovery"
    assert record["training"]["held_out_windows"] == 4
    assert record["training"]["device"] == "cpu"  # --device auto, and no GPU in CI
    after = json.loads(afm(*quality, "--json").stdout)
    assert after["recovery_adapter"] is True
    assert after["kld_mean"] < report["kld_mean"]
    without = json.loads(afm(*quality, "--no-recovery", "--json").stdout)
    assert without["kld_mean"] == pytest.approx(report["kld_mean"], rel=1e-6)

    generated = afm(
        "generate", "--model", str(compressed_dir), "--max-tokens", "5", "--temperature", "0",
        "--json", "hello",
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr.decode()
    assert json.loads(generated.stdout)["completion_tokens"] >= 1

    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        "\n".join(
            json.dumps({"prompt": f"Say {w}.", "completion": f"{w}!"}) for w in ("hi", "yes", "no")
        )
    )
    feature = afm(
        "adapter", "train", "--model", str(compressed_dir), "--data", str(chats), "--name",
        "on-compressed", "--steps", "2", "--batch-size", "2", "--out", str(tmp_path / "f"),
        "--run-dir", str(tmp_path / "f-run"),
    )  # fmt: skip
    assert feature.returncode == 0, feature.stderr.decode()
    trained = json.loads((tmp_path / "f" / "adapter.json").read_text())
    assert trained["init_from"] == "recovery"  # feature adapters start from the recovery adapter

    package = tmp_path / "tiny.mlpackage"
    export = afm(
        "export", "coreml", "--model", str(compressed_dir), "--out", str(package),
        "--seq-len", "16", "--json",
    )  # fmt: skip
    assert export.returncode == 0, export.stderr.decode()
    assert json.loads(export.stdout)["lut_ops"] == 14


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bpw", "1.0", "--bits", "2,4"], "cannot be met"),
        (["--group", "24"], "does not divide"),
        (["--bits", "5"], "bit widths must be"),
        (["--calibration", "/nonexistent.txt"], "not found"),
    ],
)
def test_compress_refuses_bad_input_with_one_line(tiny_dir, tmp_path, args, message):
    run = afm("compress", "--model", str(tiny_dir), "--out", str(tmp_path / "x"), *args)
    assert run.returncode == 1
    err = run.stderr.decode()
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_recover_on_a_missing_gpu_fails_clearly(compressed_dir):
    run = afm(
        "recover", "--model", str(compressed_dir), "--data", str(DEFAULT_CALIBRATION),
        "--device", "cuda",
    )  # fmt: skip
    assert run.returncode == 1
    assert "sees no GPU" in run.stderr.decode() and "Traceback" not in run.stderr.decode()


def test_loading_a_damaged_compressed_directory_fails_clearly(compressed_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("compression.json", "config.json", "tokenizer.json"):
        (broken / name).write_bytes((compressed_dir / name).read_bytes())
    run = afm("generate", "--model", str(broken), "hi")
    assert run.returncode == 1
    assert "weights.safetensors is missing" in run.stderr.decode()
