"""A base model's fingerprint: one hash over its config, tokenizer and weights.

Adapters are pinned to the fingerprint of the base they were trained on, so it must be stable across
runs, machines and re-saves: weights are hashed tensor by tensor (name, dtype, shape, bytes, sorted by
name), so sharding and the order of tensors inside safetensors files do not matter; the config is hashed
as canonical JSON without the fields that only record who saved it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from adapterhub_lite.base.embedded import resolve_base_dir
from adapterhub_lite.errors import BaseModelError

# Fields that describe the saving software, not the model.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_commit_hash", "architectures_version"}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
_CHUNK = 1 << 22
FINGERPRINT_PREFIX = "sha256:"


def _canonical_json(path: Path, drop: set[str] = frozenset()) -> bytes:
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in drop}
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _safetensors_entries(path: Path) -> list[tuple[str, str, list[int], int, int]]:
    """(name, dtype, shape, absolute start, end) of each tensor, read from the header only."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > 100_000_000:
            raise BaseModelError(
                f"{path}: safetensors header is implausibly large", hint="the file is corrupt"
            )
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out.append((name, info["dtype"], list(info["shape"]), base + start, base + end))
    return out


def _hash_weights(model_dir: Path, h: Any) -> None:
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        entries = [(e, f) for f in files for e in _safetensors_entries(f)]
        entries.sort(key=lambda item: item[0][0])
        handles = {f: f.open("rb") for f in files}
        try:
            for (name, dtype, shape, start, end), f in entries:
                h.update(json.dumps([name, dtype, shape]).encode())
                fh = handles[f]
                fh.seek(start)
                remaining = end - start
                while remaining:
                    chunk = fh.read(min(_CHUNK, remaining))
                    if not chunk:
                        raise BaseModelError(f"{f}: truncated safetensors file", hint="re-save the model")
                    h.update(chunk)
                    remaining -= len(chunk)
        finally:
            for fh in handles.values():
                fh.close()
        return
    # Older checkpoints ship pickled .bin weights only; hash their bytes (never unpickle them here).
    bins = sorted(model_dir.glob("*.bin"))
    if not bins:
        raise BaseModelError(
            f"{model_dir} has no weights (*.safetensors or *.bin)",
            hint="save the model with `save_pretrained`",
        )
    for f in bins:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)


def fingerprint(model_dir: str | Path | None) -> str:
    """Return `sha256:<hex>` over the base model's config, tokenizer files and weights."""
    path = resolve_base_dir(model_dir)
    h = hashlib.sha256(b"adapterhub-base-fingerprint-v1\0")
    h.update(b"config\0" + _canonical_json(path / "config.json", _VOLATILE_CONFIG_KEYS))
    for name in _TOKENIZER_FILES:
        f = path / name
        if f.is_file():
            data = _canonical_json(f) if name.endswith(".json") else f.read_bytes()
            h.update(name.encode() + b"\0" + data)
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.is_file():
        # The chat template shapes what the model is trained on; other fields are loader plumbing.
        cfg = json.loads(tok_cfg.read_text(encoding="utf-8"))
        keep = {k: cfg.get(k) for k in ("chat_template", "bos_token", "eos_token", "pad_token")}
        h.update(b"tokenizer_config\0" + json.dumps(keep, sort_keys=True).encode())
    h.update(b"weights\0")
    _hash_weights(path, h)
    return FINGERPRINT_PREFIX + h.hexdigest()
