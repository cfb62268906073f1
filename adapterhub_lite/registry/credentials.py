"""A hub client's token: `$ADAPTERHUB_TOKEN`, else the file `adapterhub login` writes (mode 0600)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from adapterhub_lite import atomic
from adapterhub_lite.bundles.signing import config_dir

ENV_TOKEN = "ADAPTERHUB_TOKEN"
TOKEN_FILE = "hub-tokens.json"


def token_path() -> Path:
    return config_dir() / TOKEN_FILE


def save_token(token: str, hub: str | None = None) -> Path:
    """Store a token for `hub` (or for every hub) in a file only its owner can read."""
    path = token_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    if hub:
        data.setdefault("hubs", {})[hub.rstrip("/")] = token
    else:
        data["default"] = token
    atomic.write_json(path, data)  # its temporary file is made by mkstemp: mode 0600 from the start
    return path


def load_token(hub: str) -> str | None:
    if os.environ.get(ENV_TOKEN):
        return os.environ[ENV_TOKEN].strip()
    path = token_path()
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return (data.get("hubs") or {}).get(hub.rstrip("/")) or data.get("default")
