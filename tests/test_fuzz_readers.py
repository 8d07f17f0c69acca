"""Fuzzing the readers of outside files: a corrupted or truncated file must give one clear
error (a ValueError or OSError, which the CLI prints as one line), never another exception, a
hang or an allocation sized by a lying length field. Bounded here; `benchmarks/fuzz_readers.py`
runs the same properties for longer."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import FIXTURES, byte_tokenizer, make_tiny

CLEAR_ERRORS = (ValueError, OSError)  # CheckpointError, AdapterError, DataError, ... subclass these
EXAMPLES = int(os.environ.get("OPENAFM_FUZZ_EXAMPLES", "60"))  # more: benchmarks/fuzz_readers.py
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=60_000,  # a hang fails; a slow first call (kernels warming up) does not
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON document."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            out += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            out += _paths(child, (*prefix, index))
    return out


def _replace(document: Any, path: tuple, value: Any, delete: bool) -> Any:
    document = json.loads(json.dumps(document))
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return document


binary_damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1), st.just(b"")),
    st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(
        st.just("lying length"), st.floats(0, 1), st.sampled_from([b"\xff" * 8, b"\x7f" * 8])
    ),
)


def _damage_bytes(data: bytes, damage: tuple[str, float, bytes]) -> bytes:
    kind, where, patch = damage
    at = int(where * len(data))
    if kind == "truncate":
        return data[:at]
    return data[:at] + patch + data[at + len(patch) :]


def _expect_clear_error_or_success(read: Callable[[Path], object], path: Path) -> None:
    with contextlib.suppress(CLEAR_ERRORS):
        read(path)


# --- the files under test, written once per module -------------------------------------------


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    from openafm.adapters import LoraAdapter, LoraConfig, save_adapter
    from openafm.compress.pipeline import DEFAULT_CALIBRATION, CompressConfig, compress_model
    from openafm.data.shards import write_shards
    from openafm.io import write_gguf, write_hf
    from openafm.io.compressed_checkpoint import save_compressed

    root = tmp_path_factory.mktemp("originals")
    model = make_tiny()
    write_gguf(root / "tiny.gguf", model.config, model.state_dict())
    write_hf(root / "hf", model.config, model.state_dict())
    adapter = LoraAdapter.fresh("fuzz", model, LoraConfig(rank=2, targets=("q",)), seed=0)
    save_adapter(adapter, root / "adapter")
    docs = root / "docs"
    docs.mkdir()
    (docs / "a.jsonl").write_text(json.dumps({"text": "a few words of text " * 20}) + "\n")
    write_shards(docs, root / "shards", byte_tokenizer())
    compressed = compress_model(
        make_tiny(), byte_tokenizer(), DEFAULT_CALIBRATION,
        CompressConfig(calibration_tokens=512, window=128, sensitivity_tokens=64),
    )  # fmt: skip
    save_compressed(compressed.model, root / "compressed", made_with={"test": True})
    return {"gguf": root / "tiny.gguf", "hf": root / "hf", "adapter": root / "adapter",
            "shards": root / "shards", "compressed": root / "compressed"}  # fmt: skip


def _copy(source: Path, target: Path) -> Path:
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy(source, target)
    return target


READERS: dict[str, tuple[str, Callable[[Path], object]]] = {}


def _readers() -> dict[str, tuple[str, Callable[[Path], object]]]:
    """kind -> (the file inside the copy that is damaged, the reader of the copy)."""
    from openafm.adapters import load_adapter
    from openafm.data.shards import read_shards
    from openafm.io import read_hf
    from openafm.io.compressed_checkpoint import load_compressed
    from openafm.io.gguf_file import read_gguf

    return {
        "gguf": ("", read_gguf),
        "hf": ("model.safetensors", read_hf),
        "adapter": ("adapter.safetensors", load_adapter),
        "shards": ("shard-00000.bin", lambda p: read_shards(p)),
        "compressed": ("weights.safetensors", load_compressed),
    }


JSON_FILES = {
    "hf": "config.json",
    "adapter": "adapter.json",
    "shards": "manifest.json",
    "compressed": "compression.json",
}


@pytest.mark.parametrize("kind", ["gguf", "hf", "adapter", "shards", "compressed"])
@FUZZ
@given(damage=binary_damage)
def test_damaged_binary_files_give_a_clear_error(originals, tmp_path, kind, damage):
    name, read = _readers()[kind]
    copy = _copy(originals[kind], tmp_path / "copy")
    target = copy / name if name else copy
    target.write_bytes(_damage_bytes(target.read_bytes(), damage))
    _expect_clear_error_or_success(read, copy)


@pytest.mark.parametrize("kind", ["hf", "adapter", "shards", "compressed"])
@FUZZ
@given(data=st.data())
def test_damaged_json_metadata_gives_a_clear_error(originals, tmp_path, kind, data):
    _, read = _readers()[kind]
    copy = _copy(originals[kind], tmp_path / "copy")
    meta = copy / JSON_FILES[kind]
    document = json.loads(meta.read_text())
    path = data.draw(st.sampled_from(_paths(document)))
    damaged = _replace(document, path, data.draw(json_values), data.draw(st.booleans()))
    meta.write_text(json.dumps(damaged))
    _expect_clear_error_or_success(read, copy)


WEB_INPUTS = {
    "warc": FIXTURES / "warc" / "warcio_example-digest.warc",
    "html": FIXTURES / "web-html" / "pages",
}


@pytest.mark.parametrize("kind", ["warc", "html", "jsonl"])
@FUZZ
@given(damage=binary_damage)
def test_damaged_web_inputs_become_rejected_documents_not_errors(tmp_path, kind, damage):
    """The curation readers turn a damaged input into rejected documents and go on."""
    from openafm.data.readers import read_web_file

    if kind == "jsonl":
        data = (json.dumps({"text": "a page of text", "id": "p1"}) + "\n") * 3
        original, name = data.encode(), "docs.jsonl"
    elif kind == "html":
        page = sorted(WEB_INPUTS["html"].iterdir())[0]
        original, name = page.read_bytes(), "page.html"
    else:
        original, name = WEB_INPUTS["warc"].read_bytes(), "crawl.warc"
    path = tmp_path / name
    path.write_bytes(_damage_bytes(original, damage))
    for document in read_web_file(str(path)):
        assert isinstance(document.text, str)


SMOLLM2_TEMPLATE = (  # the shape of the default model's template (ChatML with a default system)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
JINJA_PIECES = ["{{", "}}", "{%", "%}", "{#", " 1/0 ", "messages[7]", "|int", " + 1", "loop.",
                "raise_exception('no')", "'", '"', " endfor ", "range(3)", "none.x", "[0]"]  # fmt: skip


@FUZZ
@given(
    cut=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    inserts=st.lists(st.tuples(st.floats(0, 1), st.sampled_from(JINJA_PIECES)), max_size=3),
)
def test_a_damaged_chat_template_gives_a_clear_error(cut, inserts):
    """A model's chat template is code from a file: any failure of it is one clear error."""
    from openafm.tokenizer.chat import ChatTemplate, ChatTemplateError

    source = SMOLLM2_TEMPLATE
    start, length = int(cut[0] * len(source)), int(cut[1] * 20)
    source = source[:start] + source[start + length :]
    for where, piece in inserts:
        at = int(where * len(source))
        source = source[:at] + piece + source[at:]
    try:
        rendered = ChatTemplate(source).render([{"role": "user", "content": "hi"}])
    except ChatTemplateError:
        return
    assert isinstance(rendered, str)
