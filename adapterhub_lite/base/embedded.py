"""Where the embedded base model lives, and how a user's base reference becomes a directory."""

from __future__ import annotations

from pathlib import Path

from adapterhub_lite.errors import BaseModelError

EMBEDDED_BASE_NAME = "ahl-tiny-llama"
EMBEDDED_BASE_DIR = Path(__file__).parent / "assets" / EMBEDDED_BASE_NAME


def resolve_base_dir(base: str | Path | None) -> Path:
    """Turn a base reference (None, "embedded", or a local directory) into an existing model directory.

    Nothing is fetched from a model hub: a name that is not a local directory is an error.
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
    if not (path / "config.json").is_file():
        raise BaseModelError(
            f"{path} has no config.json, so it is not a Hugging Face model directory",
            hint="save the model with `model.save_pretrained(dir)` and `tokenizer.save_pretrained(dir)`",
        )
    return path.resolve()
