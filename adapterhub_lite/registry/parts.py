"""What the registry's operations work on: its index, its blobs, the keys it trusts and how it is named.

`publish`, `pull`, `access` and `check` take these parts, not the `Registry` facade that composes them,
so the facade can import them without a circle (`Registry` satisfies this protocol as it stands).
"""

from __future__ import annotations

from typing import Protocol

from adapterhub_lite.registry.blobs import BlobStore
from adapterhub_lite.registry.index import Index
from adapterhub_lite.registry.trust import Trust


class RegistryParts(Protocol):
    """The index (versions, access), the content-addressed blobs, the trust policy, the shown name."""

    index: Index
    blobs: BlobStore
    trusted: Trust
    shown: str
