"""Fetching the default model: verified by sha256, corrupt or partial copies replaced."""

from __future__ import annotations

import shutil

import pytest

from openafm.files import sha256_file
from openafm.io import KNOWN_MODELS, fetch_model, resolve_model
from openafm.io.fetch import DEFAULT_MODEL, cached_path
from tests.test_cli import afm

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_corrupt_cached_file_is_replaced(tmp_path, damage):
    known = KNOWN_MODELS[DEFAULT_MODEL]
    good = resolve_model()  # the normal cache: fetched once for the whole suite
    target = cached_path(known, tmp_path)
    target.parent.mkdir(parents=True)
    shutil.copyfile(good, target)
    data = bytearray(target.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 3]
    else:
        data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    proc = afm("model", "fetch", "--json", home=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "corrupt or partial" in proc.stderr.decode()
    assert sha256_file(target) == known.sha256


def test_fetch_is_a_no_op_when_verified(tmp_path):
    good = resolve_model()
    before = good.stat().st_mtime_ns
    assert fetch_model() == good
    assert good.stat().st_mtime_ns == before
