"""vLLM's worker memory under adapter churn: an adapter reader that leaks nothing, and the probes that
found the leak.

- `install_lora_file_reader()`: vLLM 0.32 reads an adapter's weights with `safetensors.safe_open(...)`
  and `get_tensor` (`vllm.lora.lora_model.LoRAModel.from_local_checkpoint`); in safetensors 0.8 every
  `get_tensor` keeps two small Python objects alive for good, so each adapter load leaves about 1 KiB
  (two per tensor) in the worker, without bound. The reader that replaces it there (`OwnedSafetensors`)
  parses the file's header itself and reads each tensor into memory it owns (no mmap either, so a
  cached file the disk cache deletes is not held by the worker); measured by
  benchmarks/lora_churn_memory.py and benchmarks/soak_bench.py;
- `mallinfo2()`: glibc's own account of its heap (bytes in use, free in the arenas, mmapped), so RSS
  growth can be split into live allocations, fragmentation and pages never returned;
- `rss_bytes()`: this process's resident set;
- `install_lora_probe(path)`: in vLLM's worker (vLLM 0.32: `vllm.v1.worker.gpu_worker.Worker`, which
  the CPU worker inherits), after every `add_lora` / `remove_lora` append one JSON line to `path` with
  RSS and `mallinfo2`; every `ADAPTERHUB_MEMORY_PROBE_EVERY` changes also the live Python objects by
  type, and, with `ADAPTERHUB_MEMORY_PROBE_TRACEMALLOC=N` (frames), the allocation sites that grew
  since the first report. `ADAPTERHUB_MEMORY_PROBE=/path/probe.jsonl` turns it on (the plugin reads
  it); a diagnostic, off by default (benchmarks/lora_churn_memory.py uses it);
- `install_engine_probe(path)`: the same figures from vLLM's engine-core process (vLLM 0.32:
  `vllm.v1.engine.core.EngineCore.add_request`), one line every `ADAPTERHUB_MEMORY_PROBE_EVERY`
  requests, to `<ADAPTERHUB_MEMORY_PROBE>.engine` (with the same tracemalloc option).

On a vLLM whose loader reads adapters otherwise, neither is installed, with one log line saying so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import logging
import os
import struct
import sys
import threading
import time
import tracemalloc
import types
from collections import Counter
from typing import Any

from adapterhub_lite.settings import env_name, settings

logger = logging.getLogger("adapterhub.serving")

ENV_PROBE = env_name("memory_probe")
ENV_PROBE_EVERY = env_name("memory_probe_every")
ENV_PROBE_TRACEMALLOC = env_name("memory_probe_tracemalloc")

# struct mallinfo2 (glibc >= 2.33), in order: every field a size_t.
_MALLINFO2_FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2_FIELDS]


def _libc() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def mallinfo2() -> dict[str, int] | None:
    """glibc's heap figures (bytes): `arena` (heap from sbrk), `hblkhd` (mmapped blocks), `uordblks` (in
    use), `fordblks` (free, kept in the arenas), `keepcost` (trimmable top); None off glibc >= 2.33."""
    libc = _libc()
    fn = getattr(libc, "mallinfo2", None) if libc is not None else None
    if fn is None:
        return None
    fn.restype = _MallInfo2
    info = fn()
    return {name: int(getattr(info, name)) for name in _MALLINFO2_FIELDS}


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident set size of `pid` (this process by default), from /proc; None where unreadable."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def rss_parts(pid: int | str = "self") -> dict[str, int]:
    """RssAnon / RssFile / RssShmem (bytes) from /proc/PID/status, and the count of memory mappings:
    growth in mapped files or in mappings points outside the C heap."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:", "RssShmem:", "Threads:")):
                    name, value = line.split(":", 1)
                    parts = value.split()
                    out[name] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
        with open(f"/proc/{pid}/maps") as f:
            out["maps"] = sum(1 for _ in f)
    except (OSError, ValueError):
        pass
    return out


def _type_counts() -> Counter[str]:
    counts: Counter[str] = Counter()
    for obj in gc.get_objects():
        t = type(obj)
        counts[f"{t.__module__}.{t.__qualname__}"] += 1
    return counts


class LoraProbe:
    """Appends one JSON line per LoRA change (and a detailed one every `every` changes) to `path`."""

    def __init__(self, path: str, every: int = 200, frames: int = 0) -> None:
        self.path = path
        self.every = max(1, every)
        self.changes = 0
        self._lock = threading.Lock()
        self._types0: Counter[str] | None = None
        self._snap0: tracemalloc.Snapshot | None = None
        self.frames = frames  # tracing starts at the first change: only the worker makes any

    def record(self, op: str, seconds: float, **extra: Any) -> None:
        if self.frames > 0 and not tracemalloc.is_tracing():
            tracemalloc.start(self.frames)
        self._record(op, seconds, extra)

    def _record(self, op: str, seconds: float, extra: dict[str, Any]) -> None:
        with self._lock:
            self.changes += 1
            line: dict[str, Any] = {
                "t": time.time(),
                "n": self.changes,
                "op": op,
                "s": round(seconds, 4),
                "rss": rss_bytes(),
                **rss_parts(),
                "mallinfo2": mallinfo2(),
                **extra,
            }
            if tracemalloc.is_tracing():
                line["traced"] = tracemalloc.get_traced_memory()[0]
            if self.changes % self.every == 0:
                line.update(self._detail())
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")

    def _detail(self) -> dict[str, Any]:
        gc.collect()
        types = _type_counts()
        out: dict[str, Any] = {"objects": sum(types.values())}
        if self._types0 is None:
            self._types0 = types
        else:
            grown = (types - self._types0).most_common(15)
            out["objects_grown"] = grown
        if tracemalloc.is_tracing():
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
            if self._snap0 is None:
                self._snap0 = snap
            else:
                stats = snap.compare_to(self._snap0, "traceback")[:12]
                out["tracemalloc_grown"] = [
                    {"bytes": s.size_diff, "count": s.count_diff, "where": s.traceback.format()[-6:]}
                    for s in stats
                ]
        return out


# safetensors dtype names -> torch dtype attribute names (the common ones; others go to safetensors).
_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_MAX_HEADER = 100 * 2**20  # safetensors' own bound on the JSON header


class OwnedSafetensors:
    """`safetensors.safe_open(path, framework="pt")` for reading a file once: `keys()`, `get_tensor(name)`
    and `metadata()`, each tensor read into memory of its own (no mmap, nothing kept after the read).

    ValueError naming the file when the header or a tensor's extent is malformed.
    """

    def __init__(self, path: str | os.PathLike, framework: str = "pt", device: str = "cpu") -> None:
        if framework not in ("pt", "torch") or str(device) != "cpu":
            raise ValueError(f"OwnedSafetensors reads torch tensors to the CPU, not {framework}/{device}")
        self.path = os.fspath(path)
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by __exit__/close
        try:
            self._header, self._data_start, self._size = self._read_header()
        except BaseException:
            self._file.close()
            raise
        self._fallback: dict[str, Any] | None = None

    def _bad(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: not a valid safetensors file ({what})")

    def _read_header(self) -> tuple[dict[str, Any], int, int]:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) != 8:
            raise self._bad("shorter than its header")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise self._bad("header length out of bounds")
        try:
            header = json.loads(self._file.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._bad("header is not JSON") from None
        if not isinstance(header, dict):
            raise self._bad("header is not an object")
        return header, 8 + n, size

    def __enter__(self) -> OwnedSafetensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        self._fallback = None

    def keys(self) -> list[str]:
        return sorted(k for k in self._header if k != "__metadata__")

    def metadata(self) -> dict[str, str] | None:
        return self._header.get("__metadata__")

    def get_tensor(self, name: str) -> Any:
        import torch

        info = self._header.get(name) if name != "__metadata__" else None
        if not isinstance(info, dict):
            raise KeyError(name)
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            dtype_name = info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise self._bad(f"entry {name!r}") from None
        dtype = getattr(torch, _DTYPES.get(dtype_name, ""), None)
        if dtype is None:  # a rarer dtype: safetensors' own decoder, on the bytes read once
            return self._from_safetensors(name)
        tensor = torch.empty(shape, dtype=dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if not (0 <= begin <= end and end - begin == nbytes and self._data_start + end <= self._size):
            raise self._bad(f"extent of {name!r}")
        if nbytes:
            self._file.seek(self._data_start + begin)
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            if self._file.readinto(view) != nbytes:
                raise self._bad(f"{name!r} truncated")
        return tensor

    def _from_safetensors(self, name: str) -> Any:
        if self._fallback is None:
            from safetensors.torch import load

            self._file.seek(0)
            self._fallback = load(self._file.read())
        return self._fallback[name]


def install_lora_file_reader() -> bool:
    """Make vLLM's LoRA loader read adapter files with `OwnedSafetensors` (see the module's docstring);
    returns whether it is installed (idempotent). On a vLLM whose loader does not call
    `safetensors.safe_open` where 0.32's does, it leaves the loader alone and logs one line."""
    try:
        from vllm.lora import lora_model
    except ImportError:
        return False
    current = getattr(lora_model, "safetensors", None)
    if getattr(current, "_adapterhub", False):
        return True
    loader = getattr(getattr(lora_model, "LoRAModel", None), "from_local_checkpoint", None)
    names = getattr(getattr(loader, "__func__", loader), "__code__", None)
    if not isinstance(current, types.ModuleType) or names is None or "safe_open" not in names.co_names:
        from adapterhub_lite.vllm_compat import VLLM

        logger.warning(
            "adapterhub: vLLM %s does not load adapters through safetensors.safe_open as 0.32 does; "
            "its reader is left as is (each adapter load may keep about 1 KiB in the worker)",
            VLLM[1] if VLLM else "(unknown)",
        )
        return False
    lora_model.safetensors = _SafetensorsWithOwnedReads(current)
    return True


class _SafetensorsWithOwnedReads(types.ModuleType):
    """The `safetensors` module as vLLM's lora_model sees it: `safe_open` is `OwnedSafetensors`."""

    _adapterhub = True

    def __init__(self, real: types.ModuleType) -> None:
        super().__init__(real.__name__, real.__doc__)
        self._real = real
        self.safe_open = OwnedSafetensors

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _worker_class() -> Any | None:
    try:
        from vllm.v1.worker.gpu_worker import Worker
    except ImportError:
        return None
    if not (callable(getattr(Worker, "add_lora", None)) and callable(getattr(Worker, "remove_lora", None))):
        return None
    return Worker


def install_lora_probe(path: str, every: int = 200, frames: int = 0) -> bool:
    """Record memory after each LoRA load/unload in vLLM's worker (see the module's docstring); returns
    whether it was installed (idempotent)."""
    worker = _worker_class()
    if worker is None:
        from adapterhub_lite.vllm_compat import VLLM

        logger.warning(
            "adapterhub: memory probe not installed: vLLM %s has no Worker.add_lora/remove_lora",
            VLLM[1] if VLLM else "(none)",
        )
        return False
    if getattr(worker.add_lora, "_adapterhub_probe", False):
        return True
    probe = LoraProbe(path, every=every, frames=frames)

    def probed(method: Any, op: str) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                probe.record(op, time.perf_counter() - t0)

        wrapper._adapterhub_probe = True  # type: ignore[attr-defined]
        wrapper._adapterhub = getattr(method, "_adapterhub", False)  # type: ignore[attr-defined]
        return wrapper

    worker.add_lora = probed(worker.add_lora, "add")
    worker.remove_lora = probed(worker.remove_lora, "remove")
    return True


def install_engine_probe(path: str, every: int = 1000, frames: int = 0) -> bool:
    """Record memory every `every` requests in vLLM's engine core (see the module's docstring), with
    the object and allocation-site growth each time; returns whether it was installed (idempotent)."""
    try:
        from vllm.v1.engine.core import EngineCore
    except ImportError:
        return False
    method = getattr(EngineCore, "add_request", None)
    if not callable(method):
        logger.warning("adapterhub: engine memory probe not installed: no EngineCore.add_request")
        return False
    if getattr(method, "_adapterhub_probe", False):
        return True
    probe = LoraProbe(path, every=1, frames=frames)  # each line it writes is a detailed one
    count = [0]

    def add_request(self: Any, *args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        if count[0] == 1 or count[0] % max(1, every) == 0:
            probe.record("requests", 0.0, requests=count[0])
        return method(self, *args, **kwargs)

    add_request._adapterhub_probe = True  # type: ignore[attr-defined]
    EngineCore.add_request = add_request
    return True


def probe_from_env() -> bool:
    """Install the probes when ADAPTERHUB_MEMORY_PROBE names a file (a diagnostic; off by default):
    the worker's per LoRA change, the engine core's per `ADAPTERHUB_MEMORY_PROBE_EVERY` requests."""
    env = settings()
    path = env.memory_probe
    if not path:
        return False
    every, frames = env.memory_probe_every, env.memory_probe_tracemalloc
    if "vllm.v1.engine.core" in sys.modules:  # the engine's process (the API server's does not run it)
        install_engine_probe(path + ".engine", every=every, frames=frames)
    return install_lora_probe(path, every=every, frames=frames)
