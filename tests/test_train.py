"""The pre-training loop on the `tiny` preset: it learns, exports a loadable model, resumes
from a checkpoint (after a kill, on another mesh, past a corrupt checkpoint) along the same
loss trajectory, and refuses bad input with one clear error."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from openafm.files import sha256_file
from openafm.train.config import PRESETS, TrainConfigError, load_train_config
from openafm.train.data import DataError
from openafm.train.metrics import read_metrics
from openafm.train.trainer import HOLD_ENV, train
from tests.conftest import FIXTURES, byte_tokenizer

TEXT = FIXTURES / "text" / "pride_and_prejudice_excerpt.txt"
TINY = PRESETS["tiny"]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    """A finished 20-step run, checkpointed every 10 steps."""
    out = tmp_path_factory.mktemp("run")
    summary = train(TINY.replace(steps=20), [TEXT], out, tokenizer=byte_tokenizer())
    return out, summary.to_dict()


def test_training_lowers_the_held_out_loss_and_logs_every_step(run):
    out, summary = run
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, 21))
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(evals) == 2  # every 10 steps
    assert evals[-1] < evals[0] < math.log(512)  # below a uniform guess, and still falling
    first = records[0]
    assert first["tokens"] == TINY.batch_size * TINY.seq_len
    assert 0 < first["mfu"] < 1 and first["tokens_per_s"] > 0
    assert summary["val_loss"] == pytest.approx(evals[-1])


def test_the_exported_run_directory_loads_as_a_model_with_the_logged_loss(run):
    from openafm.runtime import load_pretrained
    from openafm.train.data import held_out_batches, load_windows

    out, summary = run
    pretrained = load_pretrained(out)
    assert pretrained.model.config == TINY.model_config
    assert pretrained.tokenizer.vocab_size == 512
    windows = load_windows([TEXT], pretrained.tokenizer, TINY.seq_len, 512, TINY.val_fraction)
    losses = []
    for batch in held_out_batches(windows, TINY.batch_size, TINY.eval_batches):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            logits = pretrained.model(batch[:, :-1])
        losses.append(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item())
    assert sum(losses) / len(losses) == pytest.approx(summary["val_loss"], rel=2e-3)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(run, tmp_path, caplog):
    import shutil

    out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    latest = copy / "checkpoints" / "step-00000020"
    data_file = next(p for p in latest.iterdir() if p.suffix == ".distcp")
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    with caplog.at_level("WARNING", logger="openafm.train"):
        summary = train(
            TINY.replace(steps=20), [TEXT], copy, tokenizer=byte_tokenizer(), resume=True
        )
    assert "corrupt" in caplog.text and "step-00000020" in caplog.text
    assert summary.resumed_from == 10
    original, resumed = _losses(out), _losses(copy)
    for step in range(11, 21):
        assert resumed[step] == pytest.approx(original[step], rel=1e-5)


def _cli(*args: str, nproc: int = 1) -> list[str]:
    extra = ["--nproc", str(nproc)] if nproc > 1 else []
    return [sys.executable, "-m", "openafm", "train", *args, *extra]


def test_kill_and_resume_on_another_mesh_follows_the_same_trajectory(tmp_path, tiny_dir):
    # float32, so that one process and two (whose sums run in another order) agree closely
    config = tmp_path / "tiny-fp32.json"
    config.write_text(json.dumps({"preset": "tiny", "precision": "fp32", "steps": 20}))
    reference = tmp_path / "reference"
    train(load_train_config(str(config)), [TEXT], reference, tokenizer=byte_tokenizer())
    killed = tmp_path / "killed"
    args = ["--config", str(config), "--data", str(TEXT), "--tokenizer", str(tiny_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _cli(*args, "--out", str(killed), "--mesh", "dp_shard=2", nproc=2),
        env={**env, HOLD_ENV: "10"},  # the run waits after step 10's checkpoint: no race
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = killed / "checkpoints" / "step-00000010"
    deadline = time.monotonic() + 600
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # both ranks are holding (rank 0 renames the checkpoint into place last)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists(), proc.stderr.read().decode() if proc.stderr else ""
    assert not (killed / "checkpoints" / "step-00000020").exists(), "the run ended before the kill"
    resumed = subprocess.run(
        _cli(*args, "--out", str(killed), "--resume", "--mesh", "tp=2", nproc=2),
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    original, after = _losses(reference), _losses(killed)
    assert sorted(after) == list(range(1, 21))
    for step in range(1, 21):  # one process vs dp_shard=2, then tp=2 after the resume
        assert after[step] == pytest.approx(original[step], rel=1e-5), step


def test_bad_input_fails_with_one_clear_error(tmp_path, tiny_dir):
    from openafm.train import MeshError, MeshSpec
    from openafm.train.checkpoint import CheckpointMismatchError

    tok = byte_tokenizer()
    with pytest.raises(MeshError, match="needs a multiple of 2 processes, not 1"):
        train(TINY, [TEXT], tmp_path / "a", mesh=MeshSpec.parse("tp=2"), tokenizer=tok)
    with pytest.raises(DataError, match="do not split into micro-batches of 3"):
        train(TINY.replace(micro_batch=3), [TEXT], tmp_path / "b", tokenizer=tok)
    with pytest.raises(DataError, match="training data not found"):
        train(TINY, [tmp_path / "missing.txt"], tmp_path / "c", tokenizer=tok)
    wide = tmp_path / "wide"  # a shard folder tokenized for a larger vocabulary
    wide.mkdir()
    np.arange(2000, dtype=np.uint16).tofile(wide / "shard-00000.bin")
    shard = {"file": "shard-00000.bin", "tokens": 2000, "documents": 1}
    shard["sha256"] = sha256_file(wide / "shard-00000.bin")
    manifest = {"format": "openafm-token-shards/1", "dtype": "uint16", "shards": [shard]}
    (wide / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="token id 1999 is outside the model's vocabulary of 512"):
        train(TINY, [wide], tmp_path / "d", tokenizer=tok)
    with pytest.raises(TrainConfigError, match="unknown fields"):
        bad = tmp_path / "bad.toml"
        bad.write_text('preset = "tiny"\nlearning_rate = 1.0\n')
        load_train_config(str(bad))

    shards = tmp_path / "shards"
    from openafm.data.shards import write_shards

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.jsonl").write_text(json.dumps({"text": TEXT.read_text()}) + "\n")
    write_shards(docs, shards, tok)
    shard = next(shards.glob("*.bin"))
    shard.write_bytes(shard.read_bytes()[:-2] + b"\x00\x01")
    with pytest.raises(DataError, match="checksum mismatch"):
        train(TINY, [shards], tmp_path / "e", tokenizer=tok)

    wider = tmp_path / "wider"  # text read with a tokenizer larger than the preset's vocabulary
    train(TINY.replace(steps=2), [TEXT], wider, tokenizer=byte_tokenizer(1000))
    assert json.loads((wider / "config.json").read_text())["vocab_size"] == 1024

    ok = tmp_path / "ok"
    train(TINY.replace(steps=10), [TEXT], ok, tokenizer=tok)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(TINY.replace(steps=10), [TEXT], ok, tokenizer=tok)
    meta = ok / "checkpoints" / "step-00000010" / "trainer.json"
    record = json.loads(meta.read_text())
    record["model_config"]["dim"] = 128
    meta.write_text(json.dumps(record))
    with pytest.raises(CheckpointMismatchError, match="written for another model"):
        train(TINY.replace(steps=20), [TEXT], ok, tokenizer=tok, resume=True)

    cli = subprocess.run(
        _cli(
            "--config",
            "tiny",
            "--data",
            str(TEXT),
            "--out",
            str(tmp_path / "f"),
            "--tokenizer",
            str(tiny_dir),
            "--mesh",
            "dp_shard=3",
        ),
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 1
    assert (
        "error: mesh dp_replicate=1,dp_shard=3,cp=1,tp=1 has 3 places for 1 processes" in cli.stderr
    )
    assert "Traceback" not in cli.stderr


def test_plot_writes_a_png_of_one_run_or_several(run, tmp_path):
    from PIL import Image

    from openafm.train.plot import plot_runs

    out, _ = run
    for runs, png in (([out], tmp_path / "one.png"), ([out, out], tmp_path / "two.png")):
        with Image.open(plot_runs(runs, png)) as image:
            assert image.format == "PNG" and image.size == (880, 770)
    with pytest.raises(ValueError, match="needs --out"):
        plot_runs([out, out])


@pytest.mark.parametrize(
    "variant",
    [
        {"micro_batch": 2},  # four accumulated micro-batches per step
        {"activation_checkpointing": True},
    ],
    ids=["accumulation", "activation-checkpointing"],
)
def test_accumulation_and_checkpointing_leave_the_trajectory_unchanged(tmp_path, variant):
    base = TINY.replace(steps=4, precision="fp32", eval_every=100)
    tok = byte_tokenizer()
    train(base, [TEXT], tmp_path / "base", tokenizer=tok, save=False)
    train(base.replace(**variant), [TEXT], tmp_path / "variant", tokenizer=tok, save=False)
    base_losses, variant_losses = _losses(tmp_path / "base"), _losses(tmp_path / "variant")
    for step in range(1, 5):
        assert variant_losses[step] == pytest.approx(base_losses[step], rel=1e-5)


def test_the_gpu_benchmark_runs_on_the_cpu_with_a_small_configuration():
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu_train.sh"), "--config", "tiny", "--steps", "3"],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["steps"] == 3 and result["device"] == "cpu"
    assert 0 < result["mfu_median"] < 1
    assert result["tokens_per_step"] == TINY.batch_size * TINY.seq_len


def test_a_background_checkpoint_holds_the_state_of_its_step(tmp_path):
    """`async_save` (used on GPUs) stages the state before training goes on changing it."""
    import torch.distributed as dist

    from openafm.train import MeshSpec, apply_fsdp, build_mesh
    from openafm.train.checkpoint import Checkpointer
    from openafm.train.trainer import build_optimizer
    from tests.conftest import make_tiny

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = build_mesh(MeshSpec(), 1)
        model = apply_fsdp(make_tiny(seed=1), mesh)
        optimizer = build_optimizer(model, TINY)
        saved = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
        checkpointer = Checkpointer(tmp_path, keep=2, background=True)
        checkpointer.save(1, model, optimizer, {"model_config": TINY.model_config.to_dict()})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # training goes on while the checkpoint is written
        checkpointer.wait()
        fresh = apply_fsdp(make_tiny(seed=2), mesh)
        meta = checkpointer.load(fresh, build_optimizer(fresh, TINY), TINY.model_config.to_dict())
        assert meta is not None and meta["step"] == 1
        for name, p in fresh.named_parameters():
            torch.testing.assert_close(p.full_tensor(), saved[name])
    finally:
        dist.destroy_process_group()


def test_an_error_in_several_processes_reads_as_one_line(tmp_path):
    from tests.test_cli import assert_one_line_error

    args = ["--config", "tiny", "--data", str(TEXT), "--tokenizer", str(tmp_path / "none")]
    proc = subprocess.run(
        _cli(*args, "--out", str(tmp_path / "run"), nproc=2), capture_output=True, timeout=300
    )
    assert_one_line_error(proc, 1, "not found")
    err = proc.stderr.decode()
    assert err.count("not found") == 1 and "ChildFailedError" not in err


def test_a_terminated_launcher_stops_its_ranks(tmp_path, tiny_dir):
    out = tmp_path / "held"
    args = ["--config", "tiny", "--data", str(TEXT), "--out", str(out)]
    proc = subprocess.Popen(
        _cli(*args, "--tokenizer", str(tiny_dir), nproc=2),
        env={**os.environ, HOLD_ENV: "10", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step-00000010").exists() and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it held"
        time.sleep(0.1)
    proc.terminate()  # the launcher alone, not its process group
    assert proc.wait(timeout=60) != 0

    def ranks_alive() -> list[str]:
        alive = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if str(out) in cmdline.read_text():
                    alive.append(cmdline.parent.name)
            except OSError:
                continue
        return alive

    assert ranks_alive() == []
