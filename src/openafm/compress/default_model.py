"""Compressed models by name: shipped as a recipe, rebuilt deterministically on first use.

A recipe (`models/compressed/NAME/recipe.json` in the source tree) names the base and its
signature, the palettization settings, the bits of every projection, the calibration text's
checksum and the model's own signature; beside it lies the model's recovery adapter. Building
runs the calibration and the palettization at the recorded bits (no sensitivity measurement)
and takes about two minutes here; the result lives in `$OPENAFM_HOME/models/NAME` and loads by
name from then on.

The rebuild is bit-exact on the kind of CPU the recipe was written on; another instruction set
may round a few table entries differently. The built model therefore carries the recipe's
signature, not a hash of its own last bits, so adapters made for the model (its recovery
adapter, the shipped feature adapters) bind to it on every CPU.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openafm.compress.palettize import PalettizeConfig
from openafm.compress.pipeline import DEFAULT_CALIBRATION, CompressConfig, Progress, compress_model
from openafm.files import sha256_file
from openafm.io import model_signature, openafm_home
from openafm.io.compressed_checkpoint import (
    RECOVERY_DIR,
    is_compressed_dir,
    load_compressed,
    read_compression_meta,
    save_compressed,
)
from openafm.model import Transformer
from openafm.tokenizer import Tokenizer

BaseLoader = Callable[[str], tuple[Transformer, Tokenizer, str]]
"""`name -> (model, tokenizer, signature)`: how the caller loads a base model."""

log = logging.getLogger("openafm")

RECIPES_DIR = Path(__file__).resolve().parents[3] / "models" / "compressed"
RECIPE_FILE = "recipe.json"
PALETTIZED_DEFAULT = "smollm2-135m-palettized"


def recipe_names() -> list[str]:
    if not RECIPES_DIR.is_dir():
        return []
    return sorted(p.parent.name for p in RECIPES_DIR.glob(f"*/{RECIPE_FILE}"))


def built_dir(name: str) -> Path:
    return openafm_home() / "models" / name


def write_recipe(model_dir: Path, recipe_dir: Path) -> Path:
    """Turn a compressed directory (with its recovery adapter) into a shippable recipe."""
    meta = read_compression_meta(model_dir)
    made = meta["made_with"]  # `afm compress`'s record (a recipe's build lacks its settings)
    model = load_compressed(model_dir)
    recipe = {
        "signature": model_signature(model.config, model.state_dict()),
        "base": made["base"],
        "base_signature": made["base_signature"],
        "calibration_sha256": made["calibration_sha256"],
        "config": made["config"],
        "bits": {name: entry["bits"] for name, entry in meta["tensors"].items()},
        "bpw": meta["bpw"],
        "bpw_total": meta["bpw_total"],
        "weights_sha256": meta["weights_sha256"],
    }
    recipe_dir.mkdir(parents=True, exist_ok=True)
    (recipe_dir / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    if (model_dir / RECOVERY_DIR).is_dir():
        shutil.rmtree(recipe_dir / RECOVERY_DIR, ignore_errors=True)
        shutil.copytree(model_dir / RECOVERY_DIR, recipe_dir / RECOVERY_DIR)
    return recipe_dir


def _config_from(saved: dict[str, Any]) -> CompressConfig:
    settings = dict(saved)
    settings["palettize"] = PalettizeConfig(**settings["palettize"])
    settings["bit_widths"] = tuple(settings["bit_widths"])
    return CompressConfig(**settings)


def ensure_built(name: str, load_base: BaseLoader, *, progress: Progress | None = None) -> Path:
    """The directory of compressed model `name`, building it from its recipe if needed."""
    target = built_dir(name)
    recipe_dir = RECIPES_DIR / name
    if not (recipe_dir / RECIPE_FILE).is_file():
        raise ValueError(f"no recipe for a compressed model named {name!r}")
    recipe = json.loads((recipe_dir / RECIPE_FILE).read_text())
    if is_compressed_dir(target):
        if read_compression_meta(target)["made_with"].get("signature") == recipe["signature"]:
            return target
        log.info("%s was built from an older recipe; rebuilding it", name)
    if sha256_file(DEFAULT_CALIBRATION) != recipe["calibration_sha256"]:
        raise ValueError(f"the bundled calibration text is not the one {name!r} was made with")
    log.info("building %s from its recipe (first use; about two minutes)", name)
    model, tokenizer, base_signature = load_base(recipe["base"])
    if base_signature != recipe["base_signature"]:
        raise ValueError(f"the base {recipe['base']!r} is not the one {name!r} was made from")
    result = compress_model(
        model,
        tokenizer,
        DEFAULT_CALIBRATION,
        _config_from(recipe["config"]),
        bits_plan=recipe["bits"],
        progress=progress,
    )

    def extras(directory: Path) -> None:
        tokenizer.save(directory)
        if (recipe_dir / RECOVERY_DIR).is_dir():
            shutil.copytree(recipe_dir / RECOVERY_DIR, directory / RECOVERY_DIR)

    made_with = {
        "recipe": name,
        "base": recipe["base"],
        "base_signature": recipe["base_signature"],
        "signature": recipe["signature"],
    }
    path = save_compressed(
        result.model, target, made_with=made_with, write_extra=extras, overwrite=True
    )
    if read_compression_meta(path)["weights_sha256"] != recipe["weights_sha256"]:
        log.warning(
            "the rebuilt %s differs in its last bits from the recipe's build (this CPU rounds"
            " a few table entries differently); it keeps the recipe's signature",
            name,
        )
    return path
