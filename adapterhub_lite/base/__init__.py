"""Base models: loading (full precision or 4-bit NF4), fingerprints, checks, and the embedded demo base.

Names are imported on first use, so that looking at a base (`adapterhub base info`) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapterhub_lite.base.check import BaseInfo, check_base
    from adapterhub_lite.base.embedded import (
        EMBEDDED_BASE_DIR,
        EMBEDDED_BASE_NAME,
        base_name,
        resolve_base_dir,
    )
    from adapterhub_lite.base.fingerprint import fingerprint
    from adapterhub_lite.base.loading import load_base, load_tokenizer

_HOMES = {
    "BaseInfo": "check",
    "check_base": "check",
    "EMBEDDED_BASE_DIR": "embedded",
    "EMBEDDED_BASE_NAME": "embedded",
    "base_name": "embedded",
    "resolve_base_dir": "embedded",
    "fingerprint": "fingerprint",
    "load_base": "loading",
    "load_tokenizer": "loading",
}

__all__ = [
    "EMBEDDED_BASE_DIR",
    "EMBEDDED_BASE_NAME",
    "BaseInfo",
    "base_name",
    "check_base",
    "fingerprint",
    "load_base",
    "load_tokenizer",
    "resolve_base_dir",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
