"""A registry on a hub, over HTTP: the same public interface as `Registry`, for every command and the
serving resolver.

The token comes from `$ADAPTERHUB_TOKEN`, else from `adapterhub login`'s file (mode 0600). Downloads
land in a partial folder beside the destination and resume with HTTP Range after an interruption; every
file's sha256 is checked against the hub's listing, then the whole bundle is verified locally (as a
local pull does) before it is renamed into place.
"""

from __future__ import annotations

import builtins
import hashlib
import http.client
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, RootModel, ValidationError

from adapterhub_lite.bundles.archive import write_archive
from adapterhub_lite.bundles.compat import WEIGHTS_FILE
from adapterhub_lite.bundles.manifest import MANIFEST_FILE, Manifest, parse_manifest
from adapterhub_lite.bundles.naming import parse_ref
from adapterhub_lite.bundles.signing import PublicKeyLike, load_public_keys
from adapterhub_lite.bundles.values import ValueReport
from adapterhub_lite.bundles.verify import check_bundle
from adapterhub_lite.display import safe
from adapterhub_lite.errors import BundleError, ErrorKind, RegistryError
from adapterhub_lite.registry import wire
from adapterhub_lite.registry.credentials import (
    ENV_TOKEN,
    TOKEN_FILE,
    check_transport,
    load_token,
    save_token,
    token_path,
)
from adapterhub_lite.registry.intake import FileIntake, precomputed
from adapterhub_lite.registry.pull import existing_copy
from adapterhub_lite.registry.records import Published

# 1 MiB: each chunk is hashed, written and value-scanned by three threads while it is still in their
# caches (4 MiB chunks, several in flight, measured slower: benchmarks/hub_bench.py).
_CHUNK = 1 << 20
_PAGE = 500
_PUBLISHED_FIELDS = {f.name for f in fields(Published)} - {"id"}
_M = TypeVar("_M", bound=BaseModel)
_NamespaceList = RootModel[builtins.list[wire.Namespace]]
# The token helpers moved to `credentials`; importing them from here keeps working.
__all__ = [
    "ENV_TOKEN",
    "TOKEN_FILE",
    "RemoteRegistry",
    "is_hub_url",
    "load_token",
    "login",
    "save_token",
    "token_path",
]


def is_hub_url(location: object) -> bool:
    return isinstance(location, str) and location.startswith(("http://", "https://"))


def _check_ref(ref: str) -> None:
    """Refuse a malformed reference before it goes on the wire (INVALID: it can name nothing)."""
    try:
        parse_ref(ref, RegistryError)
    except RegistryError as exc:
        raise RegistryError(exc.message, hint=exc.hint, kind=ErrorKind.INVALID) from None


def _checked(model: type[_M], data: Any, what: str) -> _M:
    """An answer of the hub, validated against its wire model: a row whose name is not a name (or any
    other malformed answer) is refused, never shown."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise RegistryError(
            f"the hub sent a malformed {what} ({where or 'answer'}: {first.get('msg', 'invalid')})",
            hint="the hub is not an adapterhub hub, or something on the way changed its answer",
            kind=ErrorKind.INVALID,
        ) from None


def _published(d: Any) -> Published:
    row = _checked(wire.VersionRow, d, "version row")
    kw = {k: v for k, v in row.model_dump().items() if k in _PUBLISHED_FIELDS}
    kw["tags"] = tuple(kw.get("tags") or ())
    kw["checked_bases"] = tuple(kw.get("checked_bases") or ())
    return Published(**kw)


def _rows(data: Any) -> builtins.list[Published]:
    if not isinstance(data, builtins.list):
        raise RegistryError("the hub sent a malformed answer (not a list)", kind=ErrorKind.INVALID)
    return [_published(d) for d in data]


def _namespaces(data: Any) -> builtins.list[str]:
    return builtins.list(_checked(_NamespaceList, data, "namespace list").root)


def login(hub: str | None, token: str) -> tuple[str, str, Path]:
    """Check `token` against `hub` (whoami) and store it for that hub only; (namespace, scope, file)."""
    if not is_hub_url(hub):
        raise RegistryError(
            "which hub is this token for?",
            hint="pass --hub https://HOST (the token is checked there and sent to no other hub)",
            kind=ErrorKind.INVALID,
        )
    assert hub is not None
    client = RemoteRegistry(hub, token=token)
    try:
        who = client.whoami()
    finally:
        client.close()
    if who.namespace is None or who.scope is None:
        raise RegistryError(
            f"the hub at {hub} does not take this token", kind=ErrorKind.UNAUTHENTICATED
        )
    return who.namespace, who.scope, save_token(token, hub)


class RemoteRegistry:
    """A hub's registry, through its HTTP API (see `adapterhub_lite.hub.api`)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        trusted_keys: Iterable[PublicKeyLike] | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        self.location = self.url = url.rstrip("/")
        self.token = token if token is not None else load_token(self.url)
        if self.token:
            check_transport(self.url)
        self.trusted_keys = load_public_keys(trusted_keys)
        self._timeout_s = timeout_s
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout_s, connect=10.0)
        )

    @classmethod
    def open(cls, location: str, **kwargs: Any) -> RemoteRegistry:
        return cls(location, **kwargs)

    # ---------------------------------------------------------------- transport
    def _error(self, r: httpx.Response) -> RegistryError:
        try:
            e = wire.ErrorBody.model_validate_json(r.content).error
            return RegistryError(e.message[:2000], hint=(e.hint or "")[:2000] or None, kind=ErrorKind(e.kind))
        except (ValueError, ValidationError):
            return RegistryError(f"hub {self.url} answered HTTP {r.status_code}", kind=ErrorKind.UNAVAILABLE)

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise RegistryError(
                f"cannot reach the hub at {self.url}: {exc}",
                hint="check the URL and that `adapterhub hub serve` runs there",
                kind=ErrorKind.UNAVAILABLE,
            ) from None
        if r.status_code >= 400:
            raise self._error(r)
        return r

    def _get(self, path: str, **params: Any) -> Any:
        return self._call("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        return self._call("POST", path, json=body).json()

    def close(self) -> None:
        self._http.close()

    def whoami(self) -> wire.Whoami:
        """Who this client's token says it is (namespace and scope; None for anonymous)."""
        return _checked(wire.Whoami, self._get(wire.WHOAMI.path), "whoami answer")

    # Bulk bytes go through http.client (readinto, large blocks): httpx's pure-Python body handling
    # takes about twice the CPU per byte, which is most of a pull's time on a small machine.
    def _connection(self) -> http.client.HTTPConnection:
        u = urlsplit(self.url)
        cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        return cls(u.hostname or "", u.port, timeout=self._timeout_s, blocksize=_CHUNK)

    def _headers(self, extra: dict[str, str]) -> dict[str, str]:
        auth = {"authorization": f"Bearer {self.token}"} if self.token else {}
        return {**auth, **extra}

    def _bulk(self, method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, bytes]:
        conn = self._connection()
        try:
            try:
                conn.request(
                    method, urlsplit(self.url).path + path, body=body, headers=self._headers(headers)
                )
            except (BrokenPipeError, ConnectionResetError):
                pass  # the hub answered (a refusal) before taking the whole body: read that answer
            r = conn.getresponse()
            return r.status, r.read(1024 * 1024)
        except (OSError, http.client.HTTPException) as exc:
            raise RegistryError(
                f"cannot reach the hub at {self.url}: {exc}",
                hint="check the URL and that `adapterhub hub serve` runs there",
                kind=ErrorKind.UNAVAILABLE,
            ) from None
        finally:
            conn.close()

    def _error_from(self, status: int, data: bytes) -> RegistryError:
        return self._error(httpx.Response(status, content=data))

    # ---------------------------------------------------------------- reading
    def resolve(self, ref: str) -> Published:
        _check_ref(ref)
        return _published(self._get(wire.RESOLVE.path, ref=ref))

    def manifest(self, ref: str) -> Manifest:
        p = self.resolve(ref)
        data = self._call("GET", wire.MANIFEST.path, params={"ref": p.ref}).content
        m = parse_manifest(data, f"{self.url}:{p.ref}:{MANIFEST_FILE}")
        if m.digest != p.digest:
            raise RegistryError(
                f"the hub's manifest of {p.ref} does not match its digest", kind=ErrorKind.INTERNAL
            )
        return m

    def search(
        self, text: str = "", base: str | None = None, tag: str | None = None
    ) -> builtins.list[Published]:
        out: builtins.list[Published] = []
        while True:  # every page (the hub answers at most `_PAGE` per request)
            params = {"q": text, "base": base, "tag": tag, "limit": _PAGE, "offset": len(out)}
            r = self._call("GET", wire.SEARCH.path, params={k: v for k, v in params.items() if v is not None})
            page = _rows(r.json())
            out += page
            count = r.headers.get("x-total-count", "")
            total = int(count) if count.isascii() and count.isdigit() else len(out)
            if not page or len(out) >= total:
                return out

    def versions(self, namespace: str | None = None) -> builtins.list[Published]:
        return _rows(self._get(wire.VERSIONS.path, namespace=namespace))

    list = versions  # the name before the registry's rename

    def namespaces(self) -> builtins.list[str]:
        return _namespaces(self._get(wire.NAMESPACES.path))

    def shared_with(self, ref: str) -> builtins.list[str]:
        return _namespaces(self._get(wire.SHARED_WITH.path, ref=ref))

    def readable(self, namespace: str, base: str | None = None) -> builtins.list[Published]:
        return _rows(self._get(wire.READABLE.path, namespace=namespace, base=base))

    def can_read(self, namespace: str, ref: str) -> bool:
        try:
            answer = self._get(wire.CAN_READ.path, namespace=namespace, ref=ref)
            return _checked(wire.Readable, answer, "can-read answer").readable
        except RegistryError as exc:
            if exc.kind in (ErrorKind.NOT_FOUND, ErrorKind.INVALID):
                return False
            raise

    # ---------------------------------------------------------------- changes
    def publish(self, bundle_path: str | Path, *, progress: bool = False) -> Published:
        """Upload a bundle (archive, or a directory archived on the fly); the hub verifies and publishes."""
        src = Path(bundle_path)
        with tempfile.TemporaryDirectory(prefix="adapterhub-upload-") as td:
            if src.is_dir():
                names = sorted(p.name for p in src.iterdir())
                archive = write_archive(src, names, Path(td) / "bundle.tar")
            elif src.is_file():
                archive = src
            else:
                raise RegistryError(
                    f"bundle not found: {src}",
                    kind=ErrorKind.INVALID,
                    hint="pass a bundle directory or archive (from `adapterhub pack`)",
                )
            size = archive.stat().st_size
            with archive.open("rb") as body:
                bar = _Progress(body, size, progress, f"publish {safe(src.name, 60)}")
                status, data = 0, b""
                try:
                    status, data = self._bulk(
                        wire.PUBLISH.method,
                        wire.PUBLISH.path,
                        {"content-length": str(size), "content-type": "application/x-tar"},
                        body=bar,
                    )
                finally:
                    # A hub that already holds the files answers before taking every byte: done is done.
                    bar.close(done=0 < status < 400)
        if status >= 400:
            raise self._error_from(status, data)
        try:
            r = json.loads(data)
        except ValueError:
            raise RegistryError(
                "the hub sent a malformed answer (not JSON)", kind=ErrorKind.INVALID
            ) from None
        return _published(r)

    def yank(self, ref: str, *, reason: str = "", undo: bool = False) -> Published:
        body = wire.YankRequest(ref=ref, reason=reason, undo=undo)
        return _published(self._post(wire.YANK.path, body.model_dump()))

    def share(self, ref: str, with_namespace: str, *, revoke: bool = False) -> None:
        body = wire.ShareRequest(ref=ref, with_=with_namespace, revoke=revoke)
        self._post(wire.SHARE.path, body.model_dump(by_alias=True, exclude_none=True))

    def set_public(self, ref: str, public: bool = True) -> None:
        body = wire.ShareRequest(ref=ref, public=public)
        self._post(wire.SHARE.path, body.model_dump(by_alias=True, exclude_none=True))

    def check(self, **_: Any) -> Any:
        raise RegistryError(
            "`registry check` runs on the hub's machine, on its registry directory", kind=ErrorKind.INVALID
        )

    def trust(self, public_key: PublicKeyLike) -> str:
        raise RegistryError(
            "trusted keys of a hub are set on the hub's machine "
            "(`adapterhub registry trust KEY --registry DIR`)",
            kind=ErrorKind.INVALID,
        )

    # ---------------------------------------------------------------- pull
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
        """Download a version into `dest_dir` (resuming an interrupted download), verify it, rename it in."""
        p = self.resolve(ref)
        dest = Path(dest_dir)
        verify = dict(
            base_fingerprint=base_fingerprint,
            max_lora_rank=max_lora_rank,
            trusted_keys=self.trusted_keys,
            vllm_check=vllm_check,
        )
        if dest.exists():
            return self._existing(dest, p, verify)
        listing = _checked(wire.FileListing, self._get(wire.FILES.path, ref=p.ref), "file listing")
        if listing.digest != p.digest:
            raise RegistryError(
                f"the hub changed {p.ref} while it was being pulled; pull again", kind=ErrorKind.CONFLICT
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.parent / f".{dest.name}.{p.digest.removeprefix('sha256:')[:16]}.partial"
        partial.mkdir(exist_ok=True)
        hashes: dict[str, str] = {}
        scanned: ValueReport | BundleError | None = None
        for f in listing.files:
            name, sha = f.path, f.sha256
            values = self._download(p, name, f.size, sha, partial, progress)
            hashes[name] = sha  # checked against the bytes as they were written
            scanned = values if name == WEIGHTS_FILE else scanned
        try:
            # The files' hashes and the weights' value scan were taken on the way in: not read again.
            m = check_bundle(partial, **verify, precomputed=precomputed(hashes, scanned)).manifest
        except BundleError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise RegistryError(
                f"{p.ref} failed verification after download: {exc.message}",
                hint=exc.hint,
                kind=ErrorKind.INVALID,
            ) from None
        if m.digest != p.digest:
            shutil.rmtree(partial, ignore_errors=True)
            raise RegistryError(
                f"{p.ref}: downloaded bundle has digest {m.digest}, the hub says {p.digest}",
                kind=ErrorKind.INVALID,
            )
        os.chmod(partial, 0o755)
        try:
            os.rename(partial, dest)
        except OSError:
            if dest.exists():  # a concurrent pull won
                shutil.rmtree(partial, ignore_errors=True)
                return self._existing(dest, p, verify)
            raise
        return dest

    def _download(
        self, p: Published, name: str, size: int, sha: str, partial: Path, progress: bool
    ) -> ValueReport | BundleError | None:
        """Fetch one file (resuming a partial one) and check its sha256 and size; returns the weights'
        value scan when it ran during the download (a fresh download of the weights)."""
        if "/" in name or name.startswith(".") or name not in _ALLOWED_FILES:
            raise RegistryError(
                f"the hub listed an unexpected file {safe(name)} for {p.ref}", kind=ErrorKind.INVALID
            )
        path = partial / name
        have = path.stat().st_size if path.exists() else 0
        if have > size or (have == size and _sha256_of(path) != sha):
            path.unlink()
            have = 0
        values: ValueReport | BundleError | None = None
        if have < size:
            url = urlsplit(self.url).path + wire.file_path(p.namespace, p.name, p.version, name)
            conn = self._connection()
            try:
                conn.request("GET", url, headers=self._headers({"range": f"bytes={have}-"} if have else {}))
                r = conn.getresponse()
                if r.status >= 400:
                    raise self._error_from(r.status, r.read(64 * 1024))
                if r.status == 200 and have:  # the hub ignored the range: start over
                    have = 0
                if have:  # resuming: hash what is there, append the rest
                    h = _hasher_of(path)
                    with path.open("ab", buffering=0) as out:
                        while have <= size and (chunk := r.read(_CHUNK)):
                            h.update(chunk)
                            out.write(chunk)
                            have += len(chunk)
                    got = h.hexdigest()
                else:
                    label = f"{self.url}:{p.ref}:{name}"
                    intake = FileIntake(path, size, label, scan_values=name == WEIGHTS_FILE)
                    try:
                        while have <= size and (chunk := r.read(_CHUNK)):
                            intake.write(chunk)
                            have += len(chunk)
                    except BaseException:
                        intake.abort()
                        raise
                    got, values = intake.finish()
            except (OSError, http.client.HTTPException) as exc:
                raise RegistryError(
                    f"download of {p.ref}:{name} was interrupted ({exc})",
                    hint="run the same pull again: it resumes where it stopped",
                    kind=ErrorKind.UNAVAILABLE,
                ) from None
            finally:
                conn.close()
        else:
            got = sha  # already whole: checked above
        if have != size or got != sha:
            path.unlink(missing_ok=True)
            raise RegistryError(
                f"{p.ref}:{name}: downloaded bytes do not match the hub's sha256/size (corrupt transfer)",
                hint="pull again",
                kind=ErrorKind.UNAVAILABLE,
            )
        return values

    def _existing(self, dest: Path, p: Published, verify: dict) -> Path:
        existing_copy(dest, p, verify)
        return dest


def _hasher_of(path: Path) -> Any:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h


def _sha256_of(path: Path) -> str:
    return str(_hasher_of(path).hexdigest())


_ALLOWED_FILES = frozenset(
    ("README.md", "adapter_config.json", "adapter_model.safetensors", "manifest.json", "signatures.json")
)


class _Progress:
    """A file object for http.client's body that reports progress as it is read."""

    def __init__(self, f: Any, size: int, show: bool, desc: str) -> None:
        from tqdm import tqdm

        self._f = f
        self._bar = tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=not show)

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._bar.update(len(data))
        return data

    def close(self, done: bool) -> None:
        if done and self._bar.total is not None:
            self._bar.update(self._bar.total - self._bar.n)
        self._bar.close()

