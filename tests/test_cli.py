"""The `afm` command line on a tiny model directory: outputs, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from openafm.io import model_signature
from tests.conftest import byte_tokenizer, make_tiny


def afm(
    *args: str, stdin: bytes | None = None, home: Path | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    if home is not None:
        env["OPENAFM_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "openafm", *args],
        input=stdin,
        capture_output=True,
        env=env,
        check=False,
        timeout=600,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, pattern: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert pattern in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) <= 1


def test_generate_json_fields(tiny_dir):
    proc = afm(
        "generate", "--json", "--no-chat", "--max-tokens", "5", "--model", str(tiny_dir), "hi there"
    )
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    for key in (
        "text",
        "token_ids",
        "prompt_tokens",
        "completion_tokens",
        "finish_reason",
        "ttft_ms",
        "decode_tokens_per_s",
    ):
        assert key in out
    assert out["prompt_tokens"] == len(b"hi there")  # byte tokenizer, no BOS
    assert out["completion_tokens"] == len(out["token_ids"]) <= 5
    assert out["text"] == byte_tokenizer().decode(
        [t for t in out["token_ids"] if t != byte_tokenizer().eos_id]
    )


def test_tokenize_and_model_info(tiny_dir):
    proc = afm("tokenize", "--json", "--model", str(tiny_dir), "añb")
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["ids"] == byte_tokenizer().encode("añb")
    proc = afm("model", "info", "--json", "--model", str(tiny_dir))
    assert proc.returncode == 0, proc.stderr.decode()
    info = json.loads(proc.stdout)
    model = make_tiny()
    assert info["parameters"] == model.config.num_params()
    assert info["signature"] == model_signature(model.config, model.state_dict())
    assert info["bytes_on_disk"] > info["parameters"] * 4


def test_help_for_every_command():
    for args in (
        ["--help"],
        ["generate", "--help"],
        ["tokenize", "--help"],
        ["model", "fetch", "--help"],
        ["model", "info", "--help"],
    ):
        proc = afm(*args)
        assert proc.returncode == 0 and "Usage" in proc.stdout.decode()


def test_usage_errors_exit_2(tiny_dir):
    assert afm("generate", "--no-such-option", "x").returncode == 2
    proc = afm("generate", "--max-tokens", "0", "--model", str(tiny_dir), "x")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr.decode()


def test_missing_model_file(tmp_path):
    proc = afm("generate", "--model", str(tmp_path / "missing.gguf"), "x")
    assert_one_line_error(proc, 1, "not found")


def test_unsupported_architecture(tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    assert_one_line_error(afm("generate", "--model", str(bad), "x"), 1, "not supported")


def test_prompt_over_the_context_length(tiny_dir):
    proc = afm("generate", "--no-chat", "--model", str(tiny_dir), "x" * 300)
    assert_one_line_error(proc, 1, "does not fit the context length")


def test_invalid_utf8_on_stdin(tiny_dir):
    proc = afm("generate", "--model", str(tiny_dir), "-", stdin=b"caf\xe9 \xff")
    assert_one_line_error(proc, 1, "not valid UTF-8")


def test_unknown_model_name(tmp_path):
    proc = afm("generate", "--model", "no-such-model", "x", home=tmp_path)
    assert_one_line_error(proc, 1, "not a known name")


def test_help_lists_every_command_without_importing_any_of_them():
    code = (
        "import sys\n"
        "from openafm.cli.main import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'nltk', 'scipy') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    from openafm.cli.main import Afm

    for name, entry in Afm.lazy.items():
        assert f" {name} " in proc.stdout and entry.summary in proc.stdout


def test_every_lazy_command_loads_under_its_name():
    from openafm.cli.lazy import load_command
    from openafm.cli.main import Afm

    for name, entry in Afm.lazy.items():
        command = load_command(name, entry)
        assert command.name == name and command.help, name
        if entry.attribute == "app":  # a group, even when it holds one command
            assert getattr(command, "commands", None), name
    assert afm("export", "coreml", "--help").returncode == 0
    typo = afm("genrate", "x")
    assert typo.returncode == 2 and "Did you mean 'generate'" in typo.stderr.decode()
