"""Reading a safetensors file's header without loading (or trusting) its tensors.

The header is parsed by hand, not by the `safetensors` package, so that a corrupt or hostile file gives
a `BundleError` naming the file and the tensor instead of a Rust panic or a `SafetensorError`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

from adapterhub_lite.bundles.manifest import load_json_bounded
from adapterhub_lite.errors import BundleError

MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSORS = 65536
MAX_TENSOR_NAME = 300
# {"name": {"shape": [..]}} is 3 levels; one more is slack, anything deeper is not a safetensors header.
_HEADER_DEPTH = 4
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_FIX = "re-save the adapter with `model.save_pretrained(dir)` (safetensors) and pack it again"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def header_length(prefix: bytes, file_size: int, label: str) -> int:
    """Length of the JSON header, from the file's first 8 bytes."""
    if file_size < 8 or len(prefix) < 8:
        raise BundleError(f"{label}: not a safetensors file (only {file_size} bytes)", hint=_FIX)
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES or n > file_size - 8:
        raise BundleError(
            f"{label}: safetensors header length {n} is impossible for a {file_size}-byte file",
            hint="the file is truncated or corrupt; " + _FIX,
        )
    return n


def parse_header(prefix: bytes, file_size: int, label: str) -> tuple[list[TensorInfo], dict[str, str]]:
    """Tensors and metadata of a safetensors file, given its first bytes (at least the header).

    Checks that the data offsets tile the data section exactly, so a truncated or padded file is caught
    here before any tensor is read.
    """
    n = header_length(prefix, file_size, label)
    if len(prefix) < 8 + n:
        raise BundleError(f"{label}: truncated safetensors header", hint=_FIX)
    header = load_json_bounded(
        bytes(prefix[8 : 8 + n]), f"{label}: safetensors header", MAX_HEADER_BYTES, _HEADER_DEPTH, _FIX
    )
    if not isinstance(header, dict):
        raise BundleError(f"{label}: safetensors header is not a JSON object", hint=_FIX)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BundleError(f"{label}: safetensors __metadata__ is not an object of strings", hint=_FIX)
    if len(header) > MAX_TENSORS:
        raise BundleError(f"{label}: {len(header)} tensors, over the limit of {MAX_TENSORS}", hint=_FIX)
    tensors: list[tuple[int, int, TensorInfo]] = []
    for name, info in header.items():
        where = f"{label}: tensor {name[:MAX_TENSOR_NAME]!r}"
        if len(name) > MAX_TENSOR_NAME or not name.isprintable():
            raise BundleError(
                f"{where}: a tensor name is at most {MAX_TENSOR_NAME} printable characters", hint=_FIX
            )
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise BundleError(f"{where}: malformed header entry", hint=_FIX)
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise BundleError(f"{where}: unknown dtype {str(dtype)[:40]!r}", hint=_FIX)
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(type(d) is int and 0 <= d < 1 << 40 for d in shape)
        ):
            raise BundleError(f"{where}: malformed shape {str(shape)[:60]}", hint=_FIX)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise BundleError(f"{where}: malformed data_offsets {str(offsets)[:60]}", hint=_FIX)
        t = TensorInfo(name, dtype, tuple(shape))
        if offsets[1] - offsets[0] != t.numel * DTYPE_SIZES[dtype]:
            raise BundleError(
                f"{where}: {offsets[1] - offsets[0]} bytes do not hold {dtype}{list(shape)}", hint=_FIX
            )
        tensors.append((offsets[0], offsets[1], t))
    tensors.sort(key=lambda item: (item[0], item[1]))
    pos = 0
    for start, end, t in tensors:
        if start != pos:
            raise BundleError(f"{label}: tensor {t.name!r} overlaps another or leaves a gap", hint=_FIX)
        pos = end
    if 8 + n + pos != file_size:
        raise BundleError(
            f"{label}: the header describes {8 + n + pos} bytes but the file has {file_size}",
            hint="the file is truncated or has trailing data; " + _FIX,
        )
    return [t for _, _, t in tensors], {str(k): str(v) for k, v in metadata.items()}


def read_header(path: Path, label: str | None = None) -> tuple[list[TensorInfo], dict[str, str]]:
    """Tensors and metadata of a safetensors file on disk."""
    label = label or str(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        n = header_length(prefix, size, label)
        prefix += f.read(n)
    return parse_header(prefix, size, label)


def read_prefix(path: Path) -> bytes:
    """The first bytes of a safetensors file up to the end of its header (or fewer, if it is short)."""
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) == 8:
            (n,) = struct.unpack("<Q", prefix)
            prefix += f.read(min(n, MAX_HEADER_BYTES))
    return prefix
