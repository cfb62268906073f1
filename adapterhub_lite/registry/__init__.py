"""The registry (marketplace): publish, pull, search, yank and share adapter bundles.

An index (a SQLite file by default, or PostgreSQL) and content-addressed blobs in a local folder or any
fsspec filesystem. Open one with `open_registry(location)`; the serving plugin calls `resolve`, `pull`
and `can_read`.
"""

from adapterhub_lite.registry.blobs import BlobStore
from adapterhub_lite.registry.config import ENV_BLOBS, ENV_REGISTRY, default_location
from adapterhub_lite.registry.open import open_registry
from adapterhub_lite.registry.records import CheckReport, Published
from adapterhub_lite.registry.registry import Registry

__all__ = [
    "ENV_BLOBS",
    "ENV_REGISTRY",
    "BlobStore",
    "CheckReport",
    "Published",
    "Registry",
    "default_location",
    "open_registry",
]
