"""Packing a PEFT LoRA adapter directory into a bundle (directory or reproducible archive).

Accepts the output of `adapterhub train` (with its `training_record.json`) and any PEFT LoRA directory
written by other tools (then the base comes from `base_dir`, default the embedded base). The bundle is
assembled in a temporary directory next to the destination and renamed into place, so a failure never
leaves a half-written bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapterhub_lite import __version__
from adapterhub_lite.bundles.archive import ArchiveWriter, file_chunks
from adapterhub_lite.bundles.card import CARD_FILE, render_card
from adapterhub_lite.bundles.compat import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    base_weight_shapes,
    check_adapter,
    parse_config,
    pickle_files,
    refuse_pickles,
    serving_problem,
)
from adapterhub_lite.bundles.manifest import (
    BUNDLE_FILES,
    MANIFEST_FILE,
    AdapterInfo,
    BaseRef,
    FileEntry,
    Manifest,
    load_json_bounded,
    parse_manifest,
)
from adapterhub_lite.bundles.naming import check_name, check_tag, check_version
from adapterhub_lite.bundles.public_record import public_config, public_record
from adapterhub_lite.bundles.signing import SIGNATURES_FILE, SigningKeyLike, load_signing_key, sign_digest
from adapterhub_lite.bundles.signing import signatures_bytes as _signatures_bytes
from adapterhub_lite.bundles.tensors import header_length, parse_header
from adapterhub_lite.bundles.values import ValueScan
from adapterhub_lite.errors import BaseModelError, BundleError, os_errors_as

RECORD_FILE = "training_record.json"
MAX_RECORD_BYTES = 512 * 1024
_LICENSE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]{0,63}")  # matched whole


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _created(record: dict[str, Any] | None) -> str:
    """Creation time: the training record's, else SOURCE_DATE_EPOCH (reproducible builds), else now."""
    if record and isinstance(record.get("created"), str):
        try:
            dt = datetime.fromisoformat(record["created"].replace("Z", "+00:00"))
            return _iso((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp())
        except ValueError:
            pass
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    if epoch.isascii() and epoch.isdigit():  # "²".isdigit() is true, and int() fails on it
        return _iso(int(epoch))
    return _iso(time.time())


def _entry_for(path: Path, data: bytes) -> FileEntry:
    return FileEntry(path=path.name, size=len(data), sha256=hashlib.sha256(data).hexdigest())


def _base_for(base_dir: str | Path | None, record: dict[str, Any] | None, adapter_dir: Path):
    from adapterhub_lite.base import EMBEDDED_BASE_NAME, fingerprint, resolve_base_dir

    rec_base = record.get("base") if record and isinstance(record.get("base"), dict) else {}
    if base_dir is None and isinstance(rec_base.get("path"), str) and Path(rec_base["path"]).is_dir():
        base_dir = rec_base["path"]
    try:
        path = resolve_base_dir(base_dir)
    except BaseModelError as exc:
        raise BundleError(
            f"cannot pack {adapter_dir}: {exc.message}",
            hint="pass --base DIR, the base model the adapter was trained on",
        ) from None
    fp = fingerprint(path)
    want = rec_base.get("fingerprint")
    if isinstance(want, str) and want != fp:
        raise BundleError(
            f"{adapter_dir / RECORD_FILE}: the adapter was trained on base {rec_base.get('name')!r} "
            f"({want}), but the base given ({path}) has fingerprint {fp}",
            hint="pass --base DIR pointing at the base model it was trained on",
        )
    from adapterhub_lite.base.embedded import EMBEDDED_BASE_DIR

    if path == EMBEDDED_BASE_DIR.resolve():
        name = EMBEDDED_BASE_NAME
    elif isinstance(rec_base.get("name"), str) and rec_base["name"]:
        name = rec_base["name"]
    else:
        name = path.name
    return path, name, fp


def pack_bundle(
    adapter_dir: str | Path,
    out_path: str | Path,
    *,
    namespace: str,
    name: str,
    version: str,
    base_dir: str | Path | None = None,
    license: str = "apache-2.0",
    signing_key: SigningKeyLike | None = None,
    max_lora_rank: int | None = None,
    archive: bool = False,
    description: str = "",
    tags: Iterable[str] = (),
    vllm_check: bool | None = None,
    progress: bool = False,
    on_warning: Callable[[str], object] | None = None,
) -> Path:
    """Pack a PEFT LoRA adapter directory into a bundle at `out_path`; return `out_path`.

    Refuses (BundleError, nothing written) pickled weights, adapters vLLM cannot serve (see
    `compat.check_adapter`), a training record for another base, invalid names, and an existing
    `out_path`. With `archive=True` the bundle is one reproducible tar file. Non-finite weights are
    refused while the weights are copied; absurd magnitudes and a base vLLM serves no LoRA on are
    passed to `on_warning` (one line each). The training record is recorded without local paths
    (`public_record`), and `base_model_name_or_path` names the base.
    """
    with os_errors_as(
        BundleError,
        f"cannot pack {adapter_dir}",
        hint="check the paths, permissions and free disk space; nothing was written",
    ):
        from tqdm import tqdm

        adapter_dir, out_path = Path(adapter_dir), Path(out_path)
        check_name(namespace, "namespace")
        check_name(name, "name")
        check_version(version)
        tags = [check_tag(t) for t in tags]
        if not isinstance(license, str) or not _LICENSE_RE.fullmatch(license):
            raise BundleError(
                f"invalid license {license!r}", hint="use an SPDX-style id such as apache-2.0 or mit"
            )
        if not adapter_dir.is_dir():
            raise BundleError(
                f"adapter directory not found: {adapter_dir}",
                hint="pass the directory that holds adapter_config.json",
            )
        names = [p.name for p in adapter_dir.iterdir() if p.is_file()]
        if WEIGHTS_FILE not in names:
            weights = [n for n in pickle_files(names) if n.startswith("adapter_model")]
            refuse_pickles(weights, str(adapter_dir))
            raise BundleError(
                f"{adapter_dir}: no {WEIGHTS_FILE}",
                hint="save the adapter with `model.save_pretrained(dir)` (PEFT)",
            )
        if CONFIG_FILE not in names:
            raise BundleError(f"{adapter_dir}: no {CONFIG_FILE}", hint="is this a PEFT adapter directory?")
        if out_path.exists():
            raise BundleError(f"{out_path} already exists", hint="remove it or choose another output path")

        config_bytes = (adapter_dir / CONFIG_FILE).read_bytes()
        config = parse_config(config_bytes, str(adapter_dir / CONFIG_FILE))
        weights_path = adapter_dir / WEIGHTS_FILE
        with weights_path.open("rb") as f:
            prefix = f.read(8)
            header_len = header_length(prefix, weights_path.stat().st_size, str(weights_path))
            prefix += f.read(header_len)
        tensors, _ = parse_header(prefix, weights_path.stat().st_size, str(weights_path))
        scan = ValueScan(tensors, 8 + header_len, str(weights_path))
        record = None
        if (adapter_dir / RECORD_FILE).is_file():
            record = load_json_bounded(
                (adapter_dir / RECORD_FILE).read_bytes(),
                str(adapter_dir / RECORD_FILE),
                max_bytes=MAX_RECORD_BYTES,
                max_depth=16,
            )
            if not isinstance(record, dict):
                raise BundleError(
                    f"{adapter_dir / RECORD_FILE}: not a JSON object",
                    hint="remove it, or train again with `adapterhub train`",
                )
        base_path, base_name, base_fp = _base_for(base_dir, record, adapter_dir)
        base_shapes = base_weight_shapes(base_path)
        shape = check_adapter(
            config,
            tensors,
            base_shapes=base_shapes,
            base_label=f"base {base_name!r}",
            max_lora_rank=max_lora_rank,
            vllm_check=vllm_check,
            config_label=str(adapter_dir / CONFIG_FILE),
            weights_label=str(adapter_dir / WEIGHTS_FILE),
        )
        signer = load_signing_key(signing_key) if signing_key is not None else None
        warn = on_warning or (lambda _line: None)
        unservable = serving_problem(base_shapes) if vllm_check is not False else None
        if unservable:
            warn(f"{unservable}; this bundle is for use with peft only")

        fields: dict[str, Any] = dict(
            namespace=namespace,
            name=name,
            version=version,
            description=description,
            tags=tags,
            license=license,
            base=BaseRef(name=base_name, fingerprint=base_fp),
            adapter=AdapterInfo(**shape),
            training=public_record(record),
            tool_version=__version__,
            created=_created(record),
        )
        # The card depends on every manifest field but `files`, so it is known before any weight is hashed.
        draft = Manifest(files=[FileEntry(path=p, size=0, sha256="0" * 64) for p in BUNDLE_FILES], **fields)
        small = {CARD_FILE: render_card(draft), CONFIG_FILE: public_config(config_bytes, config, base_name)}
        size = (adapter_dir / WEIGHTS_FILE).stat().st_size
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with tqdm(total=size, unit="B", unit_scale=True, desc=f"pack {name}", disable=not progress) as bar:
            writer = _write_archive if archive else _write_directory
            writer(out_path, adapter_dir / WEIGHTS_FILE, size, small, fields, signer, bar.update, scan)
        for line in scan.finish().warnings(str(weights_path)):
            warn(line)
        return out_path


def _finish(entries: list[FileEntry], fields: dict[str, Any], signer) -> tuple[bytes, bytes | None]:
    """manifest.json and signatures.json bytes, once every file's hash is known."""
    manifest = Manifest(files=sorted(entries, key=lambda e: e.path), **fields)
    data = manifest.to_json()
    parse_manifest(data)  # round-trip: what we write must be what verify accepts
    sigs = _signatures_bytes([sign_digest(signer, manifest.digest)]) if signer is not None else None
    return data, sigs


def _hashing(chunks: Iterator[bytes], h: hashlib._Hash, scan: ValueScan) -> Iterator[bytes]:
    for chunk in chunks:
        h.update(chunk)
        scan.update(chunk)
        yield chunk


def _write_directory(
    out_path: Path, weights: Path, size: int, small: dict[str, bytes], fields, signer, progress, scan
) -> None:
    staging = Path(tempfile.mkdtemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp"))
    try:
        entries = []
        for fname, data in small.items():
            (staging / fname).write_bytes(data)
            entries.append(_entry_for(staging / fname, data))
        h = hashlib.sha256()
        written = 0
        with (staging / WEIGHTS_FILE).open("wb") as out:
            for chunk in _hashing(file_chunks(weights, progress), h, scan):
                out.write(chunk)
                written += len(chunk)
        if written != size:
            raise BundleError(f"{weights}: changed while being packed", hint="pack it again")
        entries.append(FileEntry(path=WEIGHTS_FILE, size=size, sha256=h.hexdigest()))
        manifest, sigs = _finish(entries, fields, signer)
        (staging / MANIFEST_FILE).write_bytes(manifest)
        if sigs is not None:
            (staging / SIGNATURES_FILE).write_bytes(sigs)
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700
        os.rename(staging, out_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_archive(
    out_path: Path, weights: Path, size: int, small: dict[str, bytes], fields, signer, progress, scan
) -> None:
    # One pass over the weights: sorted entry order puts README.md and adapter_config.json before the
    # weights and manifest.json (which needs their hash) after them.
    with ArchiveWriter(out_path) as w:
        entries = []
        for fname in sorted(small):
            w.add(fname, len(small[fname]), [small[fname]])
            entries.append(_entry_for(Path(fname), small[fname]))
        h = hashlib.sha256()
        w.add(WEIGHTS_FILE, size, _hashing(file_chunks(weights, progress), h, scan))
        entries.append(FileEntry(path=WEIGHTS_FILE, size=size, sha256=h.hexdigest()))
        manifest, sigs = _finish(entries, fields, signer)
        w.add(MANIFEST_FILE, len(manifest), [manifest])
        if sigs is not None:
            w.add(SIGNATURES_FILE, len(sigs), [sigs])


def sign_bundle(bundle_dir: str | Path, signing_key: SigningKeyLike) -> list[str]:
    """Add a signature to a bundle directory (its digest does not change); return the signers' key ids."""
    from adapterhub_lite.bundles.signing import check_signatures
    from adapterhub_lite.bundles.verify import check_bundle

    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(
            f"{bundle_dir}: only a bundle directory can be signed in place",
            hint="pack it with --sign KEY instead",
        )
    result = check_bundle(bundle_dir, vllm_check=False)
    path = bundle_dir / SIGNATURES_FILE
    existing = json.loads(path.read_bytes())["signatures"] if path.exists() else []
    new = sign_digest(load_signing_key(signing_key), result.manifest.digest)
    sigs = [s for s in existing if s["key_id"] != new["key_id"]] + [new]
    data = _signatures_bytes(sigs)
    check_signatures(data, result.manifest.digest, [])
    # The temp file sits beside the bundle, not in it: a stray file inside would fail verification.
    tmp = bundle_dir.parent / f".{bundle_dir.name}.{SIGNATURES_FILE}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return sorted(s["key_id"] for s in sigs)
