"""Compile the native kernels once, cache them under `$OPENAFM_HOME/kernels`, and load them.

The library is compiled on first use with `torch.utils.cpp_extension` (about 15 s) for this
PyTorch, Python and machine architecture; each instruction set's code carries its own `target`
attribute and is chosen at run time from the CPU's flags, so a cached library also runs on
another CPU of the same architecture. Without a compiler, or if the build or load fails, one
warning is logged and the pure-PyTorch reference path is used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger("openafm")

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "lut_kernels.cpp", CSRC / "decoder_stack.cpp")
HEADERS = (CSRC / "kernels.h",)
# -fopenmp makes `at::parallel_for` parallel (its OpenMP pragmas are in the headers); the
# library then shares PyTorch's own OpenMP runtime (same soname), so threads follow
# `torch.set_num_threads`.
CFLAGS = ("-O3", "-std=c++17", "-fno-math-errno", "-fopenmp")
DISABLE_ENV = "OPENAFM_NATIVE_KERNELS"  # "0" turns the native kernels off


def _home() -> Path:
    return Path(os.environ.get("OPENAFM_HOME") or Path.home() / ".cache" / "openafm")


def library_key() -> str:
    """Identity of a build: sources, flags, PyTorch, Python and machine architecture."""
    digest = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    parts = (torch.__version__, sys.version, platform.machine(), " ".join(CFLAGS))
    digest.update("|".join(parts).encode())
    return digest.hexdigest()[:16]


def build_dir() -> Path:
    return _home() / "kernels" / library_key()


def _library_name() -> str:
    return f"openafm_kernels_{library_key()}"


def _compile(target: Path) -> Path:
    from torch.utils import cpp_extension

    # `ninja` is a dependency installed beside this interpreter, which may not be on PATH
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    target.mkdir(parents=True, exist_ok=True)
    log.info("compiling the native kernels into %s (once, about 15 s)", target)
    cpp_extension.load(
        name=_library_name(),
        sources=[str(s) for s in SOURCES],
        extra_cflags=list(CFLAGS),
        extra_ldflags=["-fopenmp"],
        build_directory=str(target),
        is_python_module=False,
        verbose=False,
    )
    return target / f"{_library_name()}.so"


def _load(path: Path) -> None:
    torch.ops.load_library(str(path))
    torch.ops.openafm.best_isa()  # the operators registered


@cache
def load_native() -> bool:
    """Load (compiling on first use) the native kernels; False, with one warning, if impossible."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return False
    if hasattr(torch.ops, "openafm") and hasattr(torch.ops.openafm, "best_isa"):
        return True
    target = build_dir()
    library = target / f"{_library_name()}.so"
    try:
        if library.exists():
            try:
                _load(library)
                return True
            except (OSError, RuntimeError) as exc:  # damaged, or built against another library
                log.warning("rebuilding the native kernels: the cached library failed (%s)", exc)
                shutil.rmtree(target, ignore_errors=True)
        _load(_compile(target))
        return True
    except Exception as exc:  # no compiler, headers, ninja, disk...: fall back, loudly once
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        reason = next((line for line in lines if "error:" in line), lines[-1]).strip()
        log.warning("native kernels unavailable (%s); using the PyTorch reference path", reason)
        return False
