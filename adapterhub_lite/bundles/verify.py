"""Verifying a bundle (directory or archive): schema, sizes, hashes, card, base, vLLM support, signatures.

Checks run cheapest first, so a bundle for another base or with a wrong size is refused before hundreds of
megabytes are hashed. Nothing is written, and every failure is a `BundleError` naming the file or tensor.
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

from adapterhub_lite.bundles import archive as _archive
from adapterhub_lite.bundles.card import CARD_FILE, card_matches
from adapterhub_lite.bundles.compat import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    base_weight_shapes,
    check_adapter,
    parse_config,
    refuse_pickles,
    serving_problem,
)
from adapterhub_lite.bundles.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES, Manifest, parse_manifest
from adapterhub_lite.bundles.signing import (
    SIGNATURES_FILE,
    TrustedKeyLike,
    check_signatures,
    load_trusted_keys,
)
from adapterhub_lite.bundles.tensors import TensorInfo, header_length, parse_header
from adapterhub_lite.bundles.values import ValueReport, ValueScan
from adapterhub_lite.errors import BundleError, os_errors_as

_CHUNK = 1 << 22
_SMALL = 8 * 1024 * 1024
_REPACK = "get the bundle again from its source, or pack it again with `adapterhub pack`"


class _Source:
    """Uniform read access to a bundle's files, whether a directory or an archive."""

    label: str

    def names(self) -> list[str]: ...
    def size(self, name: str) -> int: ...
    def chunks(self, name: str) -> Iterator[bytes]: ...

    def read(self, name: str, limit: int = _SMALL) -> bytes:
        if self.size(name) > limit:
            raise BundleError(
                f"{self.where(name)}: {self.size(name)} bytes is over the {limit}-byte limit", hint=_REPACK
            )
        return b"".join(bytes(c) for c in self.chunks(name))  # chunks may share one buffer

    def prefix(self, name: str, n: int) -> bytes:
        out = bytearray()
        for chunk in self.chunks(name):
            out += chunk
            if len(out) >= n:
                break
        return bytes(out[:n])

    def where(self, name: str) -> str:
        return f"{self.label}/{name}"


class _DirSource(_Source):
    def __init__(self, path: Path) -> None:
        self.path, self.label = path, str(path)
        self._names = []
        for child in sorted(path.iterdir(), key=lambda p: p.name):
            mode = child.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise BundleError(f"{child}: a bundle may not contain symlinks", hint=_REPACK)
            if not stat.S_ISREG(mode):
                raise BundleError(
                    f"{child}: a bundle holds plain files only (found a directory or device)", hint=_REPACK
                )
            self._names.append(child.name)

    def names(self) -> list[str]:
        return self._names

    def size(self, name: str) -> int:
        return (self.path / name).stat().st_size

    def prefix(self, name: str, n: int) -> bytes:
        with (self.path / name).open("rb") as f:
            return f.read(n)

    def chunks(self, name: str) -> Iterator[bytes]:
        with (self.path / name).open("rb", buffering=0) as f:
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            while n := f.readinto(buf):
                yield view[:n]


class _ArchiveSource(_Source):
    def __init__(self, path: Path) -> None:
        self.path, self.label = path, str(path)
        self.entries = {e.name: e for e in _archive.scan_archive(path)}

    def names(self) -> list[str]:
        return sorted(self.entries)

    def size(self, name: str) -> int:
        return self.entries[name].size

    def chunks(self, name: str) -> Iterator[bytes]:
        return _archive.iter_entry(self.path, self.entries[name])

    def prefix(self, name: str, n: int) -> bytes:
        return b"".join(_archive.iter_entry(self.path, self.entries[name], chunk=n, limit=n))

    def where(self, name: str) -> str:
        return f"{self.label}:{name}"


@dataclass(frozen=True)
class Precomputed:
    """Facts a caller established while the bundle's bytes arrived (`registry.intake`), so that
    `check_bundle` does not read those files again: the sha256 of files as they were written, and the
    value scan of the weights (its report, or its refusal). A weights file is skipped only when both
    its hash and its value scan are given; every comparison and refusal still happens here."""

    sha256: dict[str, str] = field(default_factory=dict)
    weights_values: ValueReport | BundleError | None = None


@dataclass
class Verification:
    """What verifying a bundle established."""

    manifest: Manifest
    signers: list[str] = field(default_factory=list)
    form: str = "directory"
    # The base fingerprint the tensors were shape-checked against (None: no base given).
    base_checked: str | None = None
    # Flagged but not refused (absurd weight magnitudes, a base vLLM serves no LoRA on): one line each.
    warnings: list[str] = field(default_factory=list)

    @property
    def digest(self) -> str:
        return self.manifest.digest


def open_source(path: str | Path, shown_as: str | None = None) -> _Source:
    path = Path(path)
    if path.is_dir():
        src: _Source = _DirSource(path)
    elif path.is_file():
        src = _ArchiveSource(path)
    else:
        src = None  # type: ignore[assignment]
    if src is not None:
        if shown_as is not None:
            # A directory extracted from `shown_as` (an archive): name its members `bundle.tar:member`.
            src.label = shown_as
            src.where = lambda name: f"{shown_as}:{name}"  # type: ignore[method-assign]
        return src
    raise BundleError(f"bundle not found: {path}", hint="pass a bundle directory or a bundle archive (.tar)")


def check_bundle(
    path: str | Path,
    *,
    base_dir: str | Path | None = None,
    base_fingerprint: str | None = None,
    max_lora_rank: int | None = None,
    trusted_keys: Iterable[TrustedKeyLike] | None = None,
    vllm_check: bool | None = None,
    progress: Callable[[int], object] | None = None,
    for_serving: bool = False,
    shown_as: str | None = None,
    precomputed: Precomputed | None = None,
) -> Verification:
    """Verify a bundle and report its manifest, signers, form, the base it was checked against and any
    warnings (see `verify_bundle`). `shown_as` names the bundle in messages (the archive a directory
    was extracted from). With `for_serving` and a known base, a base architecture on which vLLM serves
    no LoRA adapters is refused, not only flagged. `precomputed`: hashes and the value scan a caller
    made while writing the files (see `Precomputed`)."""
    with os_errors_as(
        BundleError, "cannot read the bundle", hint="check that the path exists and is readable"
    ):
        trusted = load_trusted_keys(trusted_keys)
        src = open_source(path, shown_as)
        names = src.names()
        refuse_pickles(names, src.label)
        if MANIFEST_FILE not in names:
            raise BundleError(
                f"{src.label}: not a bundle (no {MANIFEST_FILE})",
                hint="make a bundle from an adapter directory with `adapterhub pack DIR`",
            )
        manifest = parse_manifest(src.read(MANIFEST_FILE, MAX_MANIFEST_BYTES), src.where(MANIFEST_FILE))

        # The base first: an adapter for another base is refused with the name of the base it needs.
        if base_dir is not None and base_fingerprint is None:
            from adapterhub_lite.base import fingerprint, resolve_base_dir

            base_dir = resolve_base_dir(base_dir)
            base_fingerprint = fingerprint(base_dir)
        if base_fingerprint is not None and base_fingerprint != manifest.base.fingerprint:
            raise BundleError(
                f"{manifest.ref} was trained on base model {manifest.base.name!r} "
                f"({manifest.base.fingerprint}), not on this base ({base_fingerprint})",
                hint=f"load it on {manifest.base.name!r} (`adapterhub base info DIR` shows its fingerprint), "
                "or train an adapter for this base",
            )

        listed = {f.path for f in manifest.files}
        extra = sorted(set(names) - listed - {MANIFEST_FILE, SIGNATURES_FILE})
        if extra:
            raise BundleError(
                f"{src.where(extra[0])}: file not listed in {MANIFEST_FILE} (added after packing?)",
                hint=_REPACK,
            )
        for entry in manifest.files:
            if entry.path not in names:
                raise BundleError(
                    f"{src.where(entry.path)}: missing (listed in {MANIFEST_FILE})", hint=_REPACK
                )
            actual = src.size(entry.path)
            if actual != entry.size:
                raise BundleError(
                    f"{src.where(entry.path)}: {actual} bytes, but {MANIFEST_FILE} says {entry.size} "
                    "(truncated or tampered)",
                    hint=_REPACK,
                )
            if entry.path != WEIGHTS_FILE and actual > _SMALL:
                raise BundleError(
                    f"{src.where(entry.path)}: {actual} bytes is too large for this file", hint=_REPACK
                )

        # The weights' header is read before the hash pass so that their values are checked in it.
        weights_size = src.size(WEIGHTS_FILE)
        tensors: list[TensorInfo] | None = None
        header_error: BundleError | None = None
        try:
            header_len = header_length(src.prefix(WEIGHTS_FILE, 8), weights_size, src.where(WEIGHTS_FILE))
            tensors, _ = parse_header(
                src.prefix(WEIGHTS_FILE, 8 + header_len), weights_size, src.where(WEIGHTS_FILE)
            )
            scan: ValueScan | None = ValueScan(tensors, 8 + header_len, src.where(WEIGHTS_FILE))
        except BundleError as exc:
            header_error, scan = exc, None  # reported after the hashes: "tampered" says more
        small: dict[str, bytes] = {}
        known = precomputed.sha256 if precomputed is not None else {}
        prescanned = precomputed.weights_values if precomputed is not None else None
        values: ValueReport | None = None
        for entry in manifest.files:
            if entry.path in known and (entry.path != WEIGHTS_FILE or prescanned is not None):
                if known[entry.path] != entry.sha256:
                    raise BundleError(
                        f"{src.where(entry.path)}: sha256 does not match {MANIFEST_FILE} "
                        "(tampered or corrupt)",
                        hint=_REPACK,
                    )
                if entry.path != WEIGHTS_FILE:
                    small[entry.path] = src.read(entry.path)
                elif isinstance(prescanned, BundleError):
                    header_error = header_error or prescanned
                else:
                    values = prescanned
                if progress:
                    progress(entry.size)
                continue
            h = hashlib.sha256()
            keep = entry.path != WEIGHTS_FILE
            feed = scan.update if scan is not None and not keep else None
            parts = []
            for chunk in src.chunks(entry.path):
                h.update(chunk)
                if keep:
                    parts.append(bytes(chunk))
                elif feed is not None:
                    try:
                        feed(chunk)
                    except BundleError as exc:
                        # Non-finite values in a file whose hash also fails: the hash is the news.
                        header_error, feed, scan = exc, None, None
                if progress:
                    progress(len(chunk))
            if h.hexdigest() != entry.sha256:
                raise BundleError(
                    f"{src.where(entry.path)}: sha256 does not match {MANIFEST_FILE} (tampered or corrupt)",
                    hint=_REPACK,
                )
            if keep:
                small[entry.path] = b"".join(parts)
        if header_error is not None:
            raise header_error
        assert tensors is not None
        if values is None:
            assert scan is not None
            values = scan.finish()

        if not card_matches(small[CARD_FILE], manifest):
            raise BundleError(
                f"{src.where(CARD_FILE)}: the card does not match {MANIFEST_FILE} (one of them was edited)",
                hint=_REPACK,
            )

        config = parse_config(small[CONFIG_FILE], src.where(CONFIG_FILE))
        _check_named_base(config, manifest, src.where(CONFIG_FILE))
        base_shapes = base_weight_shapes(Path(base_dir)) if base_dir is not None else None
        shape = check_adapter(
            config,
            tensors,
            base_shapes=base_shapes,
            base_label=f"base {manifest.base.name!r}",
            max_lora_rank=max_lora_rank,
            vllm_check=vllm_check,
            config_label=src.where(CONFIG_FILE),
            weights_label=src.where(WEIGHTS_FILE),
        )
        warnings = values.warnings(src.where(WEIGHTS_FILE))
        if base_shapes is not None and (vllm_check is not False or for_serving):
            unservable = serving_problem(base_shapes)
            if unservable and for_serving:
                raise BundleError(
                    f"{manifest.ref} cannot be served by vLLM: {unservable}",
                    hint="use the bundle with peft (`PeftModel.from_pretrained(base, bundle_dir)`), or "
                    "train the adapter on a base family vLLM serves LoRA for (Llama, Qwen2, Mistral...)",
                )
            if unservable:
                warnings.append(f"{unservable}; this bundle is for use with peft only")
        recorded = manifest.adapter.model_dump()
        for key, value in shape.items():
            if recorded[key] != value:
                raise BundleError(
                    f"{src.where(MANIFEST_FILE)}: adapter.{key} says {recorded[key]!r}, but the "
                    f"weights and config say {value!r}",
                    hint=_REPACK,
                )

        sig_data = src.read(SIGNATURES_FILE, 64 * 1024) if SIGNATURES_FILE in names else None
        signers = check_signatures(
            sig_data, manifest.digest, trusted, src.where(SIGNATURES_FILE), namespace=manifest.namespace
        )
        return Verification(
            manifest,
            signers,
            "directory" if isinstance(src, _DirSource) else "archive",
            base_checked=base_fingerprint if base_shapes is not None else None,
            warnings=warnings,
        )


def _check_named_base(config: dict, manifest: Manifest, label: str) -> None:
    """`base_model_name_or_path` is what `AutoPeftModelForCausalLM` downloads and loads as the base: it
    must be the base the manifest pins, not another model a bundle could point its users at. Bundles
    packed before pack rewrote it carry the trainer's local path or "None": still accepted."""
    named = config.get("base_model_name_or_path")
    legacy = named in (None, "", "None") or (
        isinstance(named, str) and (named.startswith(("/", "~")) or PureWindowsPath(named).drive != "")
    )
    if not legacy and named != manifest.base.name:
        raise BundleError(
            f"{label}: base_model_name_or_path is {str(named)[:80]!r}, but the bundle is for base "
            f"{manifest.base.name!r} (peft's AutoPeftModel would load that other model)",
            hint=_REPACK,
        )
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise BundleError(
            f"{label}: task_type is {str(task)[:40]!r}; bundles hold causal-LM adapters (CAUSAL_LM)",
            hint="train with LoraConfig(task_type='CAUSAL_LM'), then pack again",
        )


def verify_bundle(
    path: str | Path,
    *,
    base_dir: str | Path | None = None,
    base_fingerprint: str | None = None,
    max_lora_rank: int | None = None,
    trusted_keys: Iterable[TrustedKeyLike] | None = None,
    vllm_check: bool | None = None,
    for_serving: bool = False,
) -> Manifest:
    """Verify a bundle directory or archive and return its manifest; raise BundleError naming the problem.

    `base_dir`/`base_fingerprint` refuse a bundle made for another base (`base_dir` also checks that every
    targeted module exists with the right shape; give both to skip fingerprinting a known base).
    `max_lora_rank` is the server's limit. With `trusted_keys` (public keys, or `TrustedKey`s scoped to
    namespaces), a valid signature by one of them that is trusted for the manifest's namespace is
    required. `vllm_check` (default: when vLLM is installed) also asks vLLM's own PEFT check.
    Non-finite weights are always refused. `for_serving` also refuses a base vLLM serves no LoRA on.
    """
    return check_bundle(
        path,
        base_dir=base_dir,
        base_fingerprint=base_fingerprint,
        max_lora_rank=max_lora_rank,
        trusted_keys=trusted_keys,
        vllm_check=vllm_check,
        for_serving=for_serving,
    ).manifest
