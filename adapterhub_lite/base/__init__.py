"""Base models: loading (full precision or 4-bit NF4), fingerprints, and the embedded demo base."""

from adapterhub_lite.base.embedded import EMBEDDED_BASE_DIR, EMBEDDED_BASE_NAME, resolve_base_dir
from adapterhub_lite.base.fingerprint import fingerprint
from adapterhub_lite.base.loading import load_base, load_tokenizer

__all__ = [
    "EMBEDDED_BASE_DIR",
    "EMBEDDED_BASE_NAME",
    "fingerprint",
    "load_base",
    "load_tokenizer",
    "resolve_base_dir",
]
