"""What the weights hold: non-finite LoRA values refused, absurd magnitudes flagged, in one streaming pass.

The scan rides along the sha256 pass that pack and verify make anyway, chunk by chunk, so the weights
are read once. The common case is one BLAS dot product per float32/float64 stretch: the sum of squares
is finite and at most ABSURD_MAGNITUDE^2 exactly when every value is finite and no larger than that.
Otherwise (and always for float16/bfloat16, which BLAS does not take) the IEEE bit patterns decide,
with two max reductions and no temporary: viewed as signed integers, the largest pattern is the largest
positive value, and +Inf/NaN are the patterns above the largest finite one; viewed as unsigned, the
largest is the largest-magnitude negative value (sign bit set), and -Inf/NaN sit above it. The cost
against the hash is measured in `benchmarks/bundle_bench.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adapterhub_lite.bundles.tensors import TensorInfo
from adapterhub_lite.errors import BundleError

# Above this, a LoRA weight is flagged: trained LoRA matrices hold values of order 1e-2..1, and the
# B.A product of two such matrices, times alpha/r, overflows float16 (max 65504) long before this.
ABSURD_MAGNITUDE = 1e3
_FIX = "the adapter's training diverged or the file was tampered with; retrain it (lower the learning rate)"

# dtype -> (unsigned view, signed view, sign bit, first non-finite magnitude pattern, float view)
_BITS = {
    "F64": (np.dtype("<u8"), np.dtype("<i8"), 1 << 63, 0x7FF0_0000_0000_0000, np.dtype("<f8")),
    "F32": (np.dtype("<u4"), np.dtype("<i4"), 1 << 31, 0x7F80_0000, np.dtype("<f4")),
    "F16": (np.dtype("<u2"), np.dtype("<i2"), 1 << 15, 0x7C00, np.dtype("<f2")),
    "BF16": (np.dtype("<u2"), np.dtype("<i2"), 1 << 15, 0x7F80, None),
}
_BLAS = ("F32", "F64")


def _magnitude(dtype: str, bits: int) -> float:
    view, _, _, _, as_float = _BITS[dtype]
    if as_float is None:  # bfloat16 is the top half of a float32
        return float(np.array([bits << 16], dtype="<u4").view("<f4")[0])
    return float(np.array([bits], dtype=view).view(as_float)[0])


def _largest_bits(dtype: str, data: bytes | memoryview, n: int) -> int:
    """The sign-cleared bit pattern of the largest magnitude among `n` values (>= the non-finite
    threshold when any is NaN or +-Inf)."""
    unsigned, signed, sign, _, _ = _BITS[dtype]
    u = np.frombuffer(data, dtype=unsigned, count=n)
    top_positive = max(int(u.view(signed).max()), 0)
    top_unsigned = int(u.max())
    top_negative = top_unsigned - sign if top_unsigned >= sign else 0
    return max(top_positive, top_negative)


@dataclass
class ValueReport:
    """The tensors flagged for absurd values (name, largest magnitude)."""

    absurd: list[tuple[str, float]] = field(default_factory=list)

    def warnings(self, label: str) -> list[str]:
        return [
            f"{label}: tensor {name!r} holds values up to {mag:.3g} in magnitude (LoRA weights are "
            f"normally below 1; above {ABSURD_MAGNITUDE:g} the adapter is likely broken)"
            for name, mag in self.absurd
        ]


class ValueScan:
    """Fed a safetensors file's bytes in order (`update`), checks every floating tensor's values.

    `tensors` are in file order (as `parse_header` returns them) and tile the data section that starts
    at `data_start`. Raises BundleError at the first tensor holding NaN or +-Inf.
    """

    def __init__(self, tensors: list[TensorInfo], data_start: int, label: str) -> None:
        from adapterhub_lite.bundles.tensors import DTYPE_SIZES

        self.label = label
        self.segments: list[tuple[int, int, TensorInfo]] = []
        pos = data_start
        for t in tensors:
            end = pos + t.numel * DTYPE_SIZES[t.dtype]
            if t.dtype in _BITS and end > pos:
                self.segments.append((pos, end, t))
            pos = end
        self.pos = 0
        self.seg = 0
        self.carry = b""
        self.tensor_max: dict[str, int] = {}
        self.report = ValueReport()

    def update(self, chunk: bytes | memoryview) -> None:
        start, end = self.pos, self.pos + len(chunk)
        self.pos = end
        while self.seg < len(self.segments):
            s0, s1, t = self.segments[self.seg]
            if s0 >= end:
                return
            lo, hi = max(s0, start), min(s1, end)
            if lo < hi:
                self._scan(t, chunk[lo - start : hi - start], last=hi == s1)
            if s1 > end:
                return
            self.seg += 1

    def _scan(self, t: TensorInfo, data: bytes | memoryview, last: bool) -> None:
        unsigned, _, _, bad, as_float = _BITS[t.dtype]
        if self.carry:
            data = self.carry + bytes(data)
            self.carry = b""
        whole = len(data) - len(data) % unsigned.itemsize
        if whole < len(data):
            self.carry = bytes(data[whole:])
        n = whole // unsigned.itemsize
        if n and not self._small(t.dtype, data, n, as_float):
            top = _largest_bits(t.dtype, data, n)
            if top >= bad:
                raise BundleError(
                    f"{self.label}: tensor {t.name!r} holds non-finite values (NaN or Inf); vLLM would "
                    "serve them as they are",
                    hint=_FIX,
                )
            if top > self.tensor_max.get(t.name, -1):
                self.tensor_max[t.name] = top
        if last:
            if self.carry:
                raise BundleError(f"{self.label}: tensor {t.name!r} ends inside a value", hint=_FIX)
            if t.name in self.tensor_max:
                mag = _magnitude(t.dtype, self.tensor_max[t.name])
                if mag > ABSURD_MAGNITUDE:
                    self.report.absurd.append((t.name, mag))

    @staticmethod
    def _small(dtype: str, data: bytes | memoryview, n: int, as_float: np.dtype | None) -> bool:
        """True when every value is finite and at most ABSURD_MAGNITUDE (one dot product)."""
        if dtype not in _BLAS:
            return False
        a = np.frombuffer(data, dtype=as_float, count=n)
        with np.errstate(all="ignore"):
            squares = float(np.dot(a, a))
        return math.isfinite(squares) and squares <= ABSURD_MAGNITUDE**2

    def finish(self) -> ValueReport:
        """The report, once every byte has been fed."""
        if self.seg < len(self.segments):
            raise BundleError(f"{self.label}: the file ended before its last tensor", hint=_FIX)
        return self.report


def scan_file(path: str | Path, label: str | None = None, chunk: int = 1 << 22) -> ValueReport:
    """Check a safetensors file on disk: BundleError at non-finite values, the report otherwise.

    For adapters that reach a server without a bundle (an admin loading a directory): the same check
    verify makes, without the rest of a bundle.
    """
    from adapterhub_lite.bundles.tensors import header_length, parse_header

    path = Path(path)
    label = label or str(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        n = header_length(prefix, size, label)
        prefix += f.read(n)
        tensors, _ = parse_header(prefix, size, label)
        scan = ValueScan(tensors, 8 + n, label)
        f.seek(0)
        while data := f.read(chunk):
            scan.update(data)
    return scan.finish()
