"""Where the embedded base model lives, and how a user's base reference becomes a checked directory."""

from __future__ import annotations

from pathlib import Path

from adapterhub_lite.base.check import check_base
from adapterhub_lite.errors import BaseModelError

EMBEDDED_BASE_NAME = "ahl-tiny-llama"
EMBEDDED_BASE_DIR = Path(__file__).parent / "assets" / EMBEDDED_BASE_NAME


def resolve_base_dir(base: str | Path | None) -> Path:
    """Turn a base reference (None, "embedded", or a local directory) into a usable model directory.

    Nothing is fetched from a model hub: a name that is not a local directory is an error, and so is a
    directory without a config, weights or a usable tokenizer (`check_base`).
    """
    if base is None or str(base) in ("embedded", EMBEDDED_BASE_NAME):
        path = EMBEDDED_BASE_DIR
    else:
        path = Path(base).expanduser()
    if not path.is_dir():
        raise BaseModelError(
            f"base model directory not found: {path}",
            hint="point to a local Hugging Face model directory (config.json + weights); "
            "models are never downloaded from a hub",
        )
    path = path.resolve()
    check_base(path)
    return path


def base_name(base_dir: str | Path) -> str:
    """The name an adapter records for its base (``base_model_name_or_path``): the directory's name.

    Never a local path (it means nothing on another machine) and never "None"; the fingerprint in the
    training record is what pins the exact weights.
    """
    path = Path(base_dir).resolve()
    return EMBEDDED_BASE_NAME if path == EMBEDDED_BASE_DIR.resolve() else path.name
