"""The registry (marketplace): publish, pull, search, yank and share adapter bundles.

An index in SQLite (WAL, transactions) and content-addressed blobs in a local folder or any fsspec
filesystem. The serving plugin calls `Registry.open`, `resolve`, `pull` and `can_read`.
"""

from adapterhub_lite.registry.blobs import BlobStore
from adapterhub_lite.registry.registry import (
    ENV_BLOBS,
    ENV_REGISTRY,
    CheckReport,
    Published,
    Registry,
    default_location,
    parse_ref,
)

__all__ = [
    "ENV_BLOBS",
    "ENV_REGISTRY",
    "BlobStore",
    "CheckReport",
    "Published",
    "Registry",
    "default_location",
    "parse_ref",
]
