"""Receiving a published bundle: unpack the archive into a private folder as it streams in (bounded in
size and time, with the bundle part's strict archive rules, hashing and value-scanning on the way), ask
vLLM's own validator, and hand the folder to the registry, whose publish verifies everything else (with
what was established on the way, so no byte is read twice) and makes the version visible in one
transaction.

Whatever happens (an error, a client that goes away, a timeout), the upload's temp files are removed;
nothing is visible before the registry's commit.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterhub_lite.bundles.compat import CONFIG_FILE, WEIGHTS_FILE, check_adapter, parse_config
from adapterhub_lite.bundles.manifest import MANIFEST_FILE, parse_manifest
from adapterhub_lite.bundles.tensors import read_header
from adapterhub_lite.bundles.verify import Precomputed
from adapterhub_lite.errors import AdapterHubError, BundleError, ErrorKind
from adapterhub_lite.hub.tokens import HubError
from adapterhub_lite.hub.unpack import StreamUnpacker

DEFAULT_MAX_UPLOAD = 2 * 1024**3
_BATCH = 1 << 20  # handed to the unpacker's threads while still in cache (see registry/remote.py)


@dataclass(frozen=True)
class Staged:
    """An upload unpacked into `folder`, with what was established on the way."""

    folder: Path
    precomputed: Precomputed


DEFAULT_IDLE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class UploadLimits:
    """How long one upload may take in all, and how many may be open at once (per token; in all)."""

    deadline_s: float = 900.0  # 2 GiB at 2.5 MB/s
    per_token: int = 2
    total: int = 8


class Uploads:
    """The folder where uploads land before the registry takes them."""

    def __init__(
        self,
        root: Path,
        max_bytes: int = DEFAULT_MAX_UPLOAD,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        vllm_check: bool | None = None,
        limits: UploadLimits = UploadLimits(),
    ) -> None:
        self.root = Path(root)
        self.limits = limits
        self._open: Counter[str] = Counter()
        self.vllm_check = vllm_check
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s
        if self.root.exists():  # left by a hub that was killed mid-upload
            shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, mode=0o700)

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir())

    @contextmanager
    def slot(self, token_id: str) -> Iterator[None]:
        """Hold one of the open-upload slots of `token_id` (LIMITED when its own or the hub's are taken)."""
        if self._open[token_id] >= self.limits.per_token or self._open.total() >= self.limits.total:
            mine = self._open[token_id] >= self.limits.per_token
            raise HubError(
                f"{'this token has' if mine else 'the hub has'} "
                f"{self.limits.per_token if mine else self.limits.total} uploads open already",
                hint="publish again when one of them has finished",
                kind=ErrorKind.LIMITED,
                retry_after=5,
            )
        self._open[token_id] += 1
        try:
            yield
        finally:
            self._open[token_id] -= 1
            if self._open[token_id] <= 0:
                del self._open[token_id]

    async def receive(self, chunks: AsyncIterator[bytes], declared: int | None) -> Staged:
        """Unpack the request body into a new private folder as it arrives (hashing and value-scanning
        on the way, in worker threads); refuse it past the size limit, when it stalls, when it takes
        longer than the upload deadline in all, or when the archive breaks a rule. Nothing is left
        behind on any failure."""
        if declared is not None and declared > self.max_bytes:
            raise _too_large(declared, self.max_bytes)
        folder = self.root / uuid.uuid4().hex
        unpacker = StreamUnpacker(folder)
        loop = asyncio.get_running_loop()
        pending: asyncio.Future | None = None
        batch: list[bytes] = []
        batched = received = 0
        try:
            idle, total = self.idle_timeout_s, self.limits.deadline_s
            end = loop.time() + total
            try:
                # One deadline moved forward per chunk (a task per chunk, as wait_for makes, costs more
                # than the chunk's bytes on a fast link), never past the upload's own end.
                async with asyncio.timeout(min(idle, total)) as deadline:
                    async for chunk in chunks:
                        deadline.reschedule(min(loop.time() + idle, end))
                        received += len(chunk)
                        if received > self.max_bytes:
                            raise _too_large(received, self.max_bytes)
                        batch.append(chunk)
                        batched += len(chunk)
                        if batched >= _BATCH:  # one worker-thread hop per batch, overlapping the next
                            if pending is not None:
                                await pending
                            pending = loop.run_in_executor(None, unpacker.feed, b"".join(batch))
                            batch, batched = [], 0
            except TimeoutError:
                if loop.time() >= end:
                    raise HubError(
                        f"upload not finished within {total:g} s",
                        hint="publish again from a faster connection",
                        kind=ErrorKind.INVALID,
                    ) from None
                raise HubError(
                    f"upload stalled: no data for {idle:g} s",
                    hint="publish again from a steadier connection",
                    kind=ErrorKind.INVALID,
                ) from None
            if pending is not None:
                await pending
                pending = None
            if batch:
                await loop.run_in_executor(None, unpacker.feed, b"".join(batch))
            if declared is not None and received != declared:
                raise HubError(
                    f"truncated upload: received {received} of {declared} bytes",
                    hint="publish again",
                    kind=ErrorKind.INVALID,
                )
            return Staged(folder, unpacker.finish())
        except BaseException:
            if pending is not None:  # the worker may still be writing into the folder
                await asyncio.wait([pending])
            unpacker.abort()
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def publish(
        self,
        registry: Any,
        staged: Staged,
        authorize: Callable[[str], None],
        bases: dict[str, Path] | None = None,
    ) -> tuple[Any, Path]:
        """Check the caller may publish under the manifest's namespace (`authorize`), check with vLLM,
        publish (blocking; the registry takes the files by hard link); return (Published, the verified
        bundle directory). The caller owns the returned directory (the hub keeps it as its serving copy).
        `bases`: the hub's bases (fingerprint -> directory); the one the bundle names checks its shapes.
        """
        bundle = staged.folder
        try:
            authorize(_namespace(bundle))
            _vllm_check(bundle, self.vllm_check)
            published = registry.publish(bundle, precomputed=staged.precomputed, owned=True, bases=bases)
        except AdapterHubError as exc:
            shutil.rmtree(bundle, ignore_errors=True)
            # The temp names mean nothing to the client: say "upload" instead.
            exc.message = exc.message.replace(str(bundle), "upload")
            raise
        except BaseException:
            shutil.rmtree(bundle, ignore_errors=True)
            raise
        return published, bundle

    def discard(self, path: Path) -> None:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            os.unlink(path)


def _too_large(n: int, limit: int) -> HubError:
    return HubError(
        f"upload of {n} bytes is over this hub's limit of {limit} bytes",
        hint="ask the hub's operator to raise --max-upload",
        kind=ErrorKind.INVALID,
    )


def _namespace(bundle: Path) -> str:
    if not (bundle / MANIFEST_FILE).is_file():
        raise BundleError(
            f"upload: not a bundle (no {MANIFEST_FILE})",
            hint="make a bundle archive with `adapterhub pack DIR --archive`",
        )
    return parse_manifest((bundle / MANIFEST_FILE).read_bytes(), f"upload:{MANIFEST_FILE}").namespace


def _vllm_check(bundle: Path, vllm_check: bool | None) -> None:
    """What `verify` adds to the registry's checks: vLLM's own validator on the config and weights."""
    config_path, weights = bundle / CONFIG_FILE, bundle / WEIGHTS_FILE
    if not config_path.is_file() or not weights.is_file():
        return  # the registry's verification names what is missing
    config = parse_config(config_path.read_bytes(), f"upload:{CONFIG_FILE}")
    tensors, _ = read_header(weights, f"upload:{WEIGHTS_FILE}")
    check_adapter(
        config,
        tensors,
        vllm_check=vllm_check,
        config_label=f"upload:{CONFIG_FILE}",
        weights_label=f"upload:{WEIGHTS_FILE}",
    )
