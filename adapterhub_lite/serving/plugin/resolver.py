"""The vLLM `LoRAResolver`: a full reference -> registry pull -> verified local copy -> `LoRARequest`.

vLLM asks every registered resolver when a request names a model it has not loaded (with runtime
LoRA updating on; vllm_compat.launch sets it). This one accepts only immutable references
`namespace/name@version`, so a name vLLM caches is never reused for other weights. Before a bundle is
handed to vLLM it is verified: file hashes, the signature when trusted keys are configured, the base
fingerprint against the served base, and vLLM's own compatibility rules for the server's max rank. A
bundle that fails is never loaded. Errors keep their kind (a locked registry stays "unavailable", a full
disk "internal"), so the middleware answers 503 or 500 for them, not "cannot be served".

A path handed to vLLM stays on disk until vLLM has read it: vLLM's worker reads the folder later, in
the engine, after `resolve_lora` has returned. The entry is leased in the disk cache from before the
path is returned until vLLM's API server reports that load done, loaded or failed
(`vllm_compat.lora_handoff` calls `handed_over`), or the lease's time runs out. Once loaded the adapter
is one vLLM holds, which pins its entry for as long as vLLM keeps it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adapterhub_lite.errors import AdapterHubError, ErrorKind, ServingError
from adapterhub_lite.registry.cache import BundleCache, Lease
from adapterhub_lite.registry.contract import RegistryAPI
from adapterhub_lite.serving import tracing
from adapterhub_lite.serving.config import ServingConfig
from adapterhub_lite.tenants.store import is_full_ref
from adapterhub_lite.vllm_compat.server import lora_request, resolver_base

logger = logging.getLogger("adapterhub.serving")
# A bundle verified this recently is not verified again: the middleware fetches just before vLLM's
# resolve_lora does, and one verification per load is enough.
_REVERIFY_AFTER_S = 30.0
# Per-reference state (locks, last verification, digest) is kept for this many references, least recently
# used first out: tenants name references without end, and forgetting one only costs a verification.
MAX_TRACKED_REFS = 1024


class _RefLock:
    """A reference's lock and how many threads hold or wait for it (an entry in use is never dropped)."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class AdapterResolver(resolver_base()):  # type: ignore[misc]
    """Resolves `namespace/name@version` through the registry into a bounded, verified disk cache."""

    def __init__(
        self, config: ServingConfig, registry: RegistryAPI | None = None, max_refs: int = MAX_TRACKED_REFS
    ) -> None:
        self.config = config
        self.max_refs = max_refs
        self.cache = BundleCache(
            config.cache_dir,
            config.cache_max_mb * 1024 * 1024,
            bound_hint="raise --cache-max-mb (ADAPTERHUB_CACHE_MAX_MB)",
        )
        self._registry = registry
        self._fingerprint: str | None = None
        self._base_dir: Path | None = None
        self._ref_locks: OrderedDict[str, _RefLock] = OrderedDict()
        self._locks_guard = threading.Lock()  # guards the three maps below and _handed
        self._verified_at: OrderedDict[str, float] = OrderedDict()
        self.digests: OrderedDict[str, str] = OrderedDict()  # ref -> digest of what was verified
        # Set by the middleware once it sees vLLM's state: refs vLLM has loaded or is about to load
        # (their files must stay).
        self.loaded_refs: Callable[[], Iterable[str]] = lambda: ()
        # Leases on paths handed to vLLM and not yet reported read, by adapter name (vLLM resolves one
        # name at a time; bounded by the cache's lease count and time).
        self._handed: dict[str, list[Lease]] = {}
        self.cache.pins = self._pinned

    def _pinned(self) -> list[str]:
        refs = list(self.loaded_refs())
        with self._locks_guard:
            return [self.digests[r] for r in refs if r in self.digests]

    @property
    def registry(self) -> Any:
        if self._registry is None:
            from adapterhub_lite.registry import open_registry

            self._registry = open_registry(self.config.registry)
        return self._registry

    def base_fingerprint(self) -> str:
        """Fingerprint of the served base, computed once."""
        if self._fingerprint is None:
            from adapterhub_lite.base import fingerprint, resolve_base_dir

            if not self.config.base_dir:
                raise ServingError(
                    "the served base model directory is unknown, so bundles cannot be checked against it",
                    hint="set ADAPTERHUB_BASE_DIR to the directory passed to vLLM's --model",
                    kind=ErrorKind.INVALID,  # a setting the server was started without: retrying won't help
                )
            self._fingerprint = fingerprint(resolve_base_dir(self.config.base_dir))
        return self._fingerprint

    def base_dir(self) -> Path:
        """The served base's directory (resolved once; base_fingerprint says why it must be known)."""
        if self._base_dir is None:
            from adapterhub_lite.base import resolve_base_dir

            self.base_fingerprint()
            self._base_dir = Path(resolve_base_dir(str(self.config.base_dir)))
        return self._base_dir

    @contextmanager
    def _holding(self, ref: str) -> Iterator[None]:
        """Hold `ref`'s lock: one fetch per reference at a time."""
        with self._locks_guard:
            entry = self._ref_locks.get(ref)
            if entry is None:
                entry = self._ref_locks[ref] = _RefLock()
            self._ref_locks.move_to_end(ref)
            entry.users += 1
            for old in [r for r, e in self._ref_locks.items() if e.users == 0][
                : max(0, len(self._ref_locks) - self.max_refs)
            ]:
                del self._ref_locks[old]
        try:
            with entry.lock:
                yield
        finally:
            with self._locks_guard:
                entry.users -= 1

    def _remember(self, ref: str, verified_at: float | None) -> None:
        """Record (or with None, forget) when `ref` was last verified, within `max_refs`."""
        with self._locks_guard:
            if verified_at is None:
                self._verified_at.pop(ref, None)
                return
            self._verified_at[ref] = verified_at
            self._verified_at.move_to_end(ref)
            while len(self._verified_at) > self.max_refs:
                self._verified_at.popitem(last=False)

    def _remember_digest(self, ref: str, digest: str) -> None:
        """Record the digest `ref` was verified as, within `max_refs` (those vLLM holds are kept)."""
        with self._locks_guard:
            self.digests[ref] = digest
            self.digests.move_to_end(ref)
            if len(self.digests) <= self.max_refs:
                return
        loaded = set(self.loaded_refs())  # their files stay pinned by digest: keep those
        with self._locks_guard:
            extra = len(self.digests) - self.max_refs
            for old in [r for r in self.digests if r not in loaded][:extra]:
                del self.digests[old]

    def fetch(self, ref: str) -> Path:
        """A verified local bundle directory for the full reference `ref` (blocking; pulls on a miss).

        Raises the registry's error for an unknown reference (kind NOT_FOUND), a locked or unreachable
        registry (UNAVAILABLE) or a failing disk (INTERNAL); BundleError (INVALID) for a bundle that
        fails verification (corrupt blobs, bad signature, another base, rank over the server's). A
        failing copy is dropped from the cache so nothing bad stays on disk.
        """
        lease = self.fetch_leased(ref)
        self.cache.release(lease)
        return lease.path

    def fetch_leased(self, ref: str, seconds: float | None = None) -> Lease:
        """As `fetch`, and the entry stays leased (not evictable) until `cache.release(lease)` or for
        `seconds` (the cache's lease time by default)."""
        if not is_full_ref(ref):
            raise ServingError(
                f"{ref!r} is not a full reference namespace/name@version", kind=ErrorKind.INVALID
            )
        from adapterhub_lite.bundles import verify_bundle

        started = time.perf_counter()
        with self._holding(ref):
            published = self.registry.resolve(ref)
            digest = published.digest
            lease: Lease | None = None
            try:
                lease = self.cache.acquire(digest, seconds)
                tracing.note(cache="miss" if lease is None else "hit")
                if lease is None:
                    lease = self.cache.put_leased(
                        digest,
                        lambda tmp: Path(self.registry.pull(ref, tmp / "bundle")),
                        size=int(getattr(published, "size", 0) or 0),
                        label=ref,
                        seconds=seconds,
                    )
                path = lease.path
                # Verified after download and again on a load more than _REVERIFY_AFTER_S after the
                # last check: the disk cache is not trusted either.
                if time.monotonic() - self._verified_at.get(ref, -1e9) > _REVERIFY_AFTER_S:
                    verifying = time.perf_counter()
                    verify_bundle(
                        path,
                        base_dir=self.base_dir(),  # every targeted module exists in the base, shapes agree
                        base_fingerprint=self.base_fingerprint(),
                        for_serving=True,
                        max_lora_rank=self.config.max_lora_rank,
                        trusted_keys=self.config.trusted_keys or None,
                    )
                    self._remember(ref, time.monotonic())
                    tracing.note(verify_ms=tracing.elapsed_ms(verifying))
            except AdapterHubError as exc:
                self._remember(ref, None)
                # A refusal for room or leases (unavailable, before a lease) created nothing to drop.
                if lease is not None or exc.kind is not ErrorKind.UNAVAILABLE:
                    self.cache.remove(digest, own=lease)
                if exc.kind is ErrorKind.NOT_FOUND:
                    # The reference resolved, so what is missing now is part of its content (a blob):
                    # the bundle cannot be served, which is not "no such model".
                    exc.kind = ErrorKind.INVALID
                raise
            except BaseException:
                if lease is not None:
                    self.cache.release(lease)
                raise
            self._remember_digest(ref, digest)
            tracing.note(fetch_ms=tracing.elapsed_ms(started))
            return lease

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
        """vLLM's hook: a request to load `lora_name`, or None when it is not ours or fails to verify."""
        if not is_full_ref(lora_name):
            return None
        try:
            lease = await asyncio.to_thread(self.fetch_leased, lora_name)
        except AdapterHubError as exc:
            # The tenancy middleware verifies before vLLM gets here and answers with the reason; this
            # path is only reached without it, where vLLM's 404 is the most it can say.
            logger.warning("adapterhub: refusing to load %s: %s", lora_name, exc)
            return None
        with self._locks_guard:
            # Leases whose time ran out (a load whose end was never reported) are forgotten here.
            self._handed = {
                name: live
                for name, leases in self._handed.items()
                if (live := [x for x in leases if self.cache.is_leased(x)])
            }
            self._handed.setdefault(lora_name, []).append(lease)
        # lora_int_id is replaced by vLLM with a fresh id from its own counter.
        return lora_request(lora_name, str(lease.path))

    def handed_over(self, lora_name: str) -> None:
        """vLLM has finished loading `lora_name` (loaded or failed): its folder may be evicted again
        (while vLLM holds the adapter, `loaded_refs` pins it)."""
        with self._locks_guard:
            leases = self._handed.pop(lora_name, [])
        for lease in leases:
            self.cache.release(lease)

    def handed_out(self) -> int:
        """Paths handed to vLLM whose read is not yet reported (leases still live)."""
        with self._locks_guard:
            held = [x for leases in self._handed.values() for x in leases]
        return sum(1 for x in held if self.cache.is_leased(x))


_RESOLVER: AdapterResolver | None = None


def get_resolver() -> AdapterResolver:
    """The process-wide resolver, configured from the environment (shared by plugin and middleware)."""
    global _RESOLVER
    if _RESOLVER is None:
        _RESOLVER = AdapterResolver(ServingConfig.from_env())
    return _RESOLVER
