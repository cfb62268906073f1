"""The registry contract: what every registry answers, a local one (`Registry`) or a hub over HTTP
(`RemoteRegistry`). Code that takes "a registry" types it `RegistryAPI` and uses only these methods;
administration that only a local registry can do (`trust`, `check`, its index) is asked of `Registry`
itself. `tests/test_registry_contract.py` checks both classes against this Protocol, method by method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from adapterhub_lite.bundles.manifest import Manifest
from adapterhub_lite.registry.records import Published


@runtime_checkable
class RegistryAPI(Protocol):
    """A marketplace of bundles: resolve, read, search, publish, pull, yank, share."""

    # -- reading
    def resolve(self, ref: str) -> Published:
        """The version a reference names; `namespace/name` is the newest version not yanked."""
        ...

    def manifest(self, ref: str) -> Manifest: ...

    def search(self, text: str = "", base: str | None = None, tag: str | None = None) -> list[Published]: ...

    def versions(self, namespace: str | None = None) -> list[Published]: ...

    def namespaces(self) -> list[str]: ...

    def readable(self, namespace: str, base: str | None = None) -> list[Published]: ...

    def can_read(self, namespace: str, ref: str) -> bool: ...

    def shared_with(self, ref: str) -> list[str]: ...

    # -- changes
    def publish(self, bundle_path: str | Path, *, progress: bool = False) -> Published: ...

    def pull(
        self,
        ref: str,
        dest_dir: str | Path,
        *,
        base_fingerprint: str | None = None,
        max_lora_rank: int | None = None,
        vllm_check: bool | None = None,
        progress: bool = False,
    ) -> Path:
        """Fetch a version into the bundle directory `dest_dir` (created atomically) and verify it."""
        ...

    def yank(self, ref: str, *, reason: str = "", undo: bool = False) -> Published: ...

    def share(self, ref: str, with_namespace: str, *, revoke: bool = False) -> None: ...

    def set_public(self, ref: str, public: bool = True) -> None: ...
