"""What `adapterhub base info` shows about a base model: checked first, then described."""

from __future__ import annotations

from pathlib import Path

from adapterhub_lite.base.check import check_base, vocab_size
from adapterhub_lite.base.embedded import base_name, resolve_base_dir
from adapterhub_lite.base.fingerprint import fingerprint


def describe_base(base: str | Path | None) -> dict:
    """What `adapterhub base info` shows: path, name, fingerprint, architecture, sizes (checked first)."""
    path = resolve_base_dir(base)
    info = check_base(path)
    config = info.config
    return {
        "path": str(path),
        "name": base_name(path),
        "fingerprint": fingerprint(path),
        "architectures": config.get("architectures"),
        "model_type": config.get("model_type"),
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "vocab_size": vocab_size(config),
        "tokenizer_size": info.tokenizer_size,
        "weights_bytes": sum(f.stat().st_size for f in info.weight_files),
    }
