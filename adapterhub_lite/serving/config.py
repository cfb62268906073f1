"""The serving settings, read from environment variables so that any `vllm serve` command line gets them.

`adapterhub serve` sets these for you. With your own vLLM command line, set them yourself:

    ADAPTERHUB_ADMIN_KEY=...              admin key for load/unload and /adapterhub/* routes (required)
    ADAPTERHUB_TENANTS_DB=~/.adapterhub/tenants.db   the tenant store (`adapterhub tenant ...` writes it)
    ADAPTERHUB_REGISTRY=~/.adapterhub/registry       where adapters are pulled from
    ADAPTERHUB_BASE_DIR=/path/to/base                the served base (its fingerprint must match bundles')
    ADAPTERHUB_CACHE_DIR=~/.adapterhub/serve-cache   verified bundles, bounded LRU on disk
    ADAPTERHUB_CACHE_MAX_MB=2048                     disk cache bound
    ADAPTERHUB_MAX_LORA_RANK=16                      = vLLM's --max-lora-rank
    ADAPTERHUB_MAX_LOADED=8                          adapters kept loaded in vLLM (the hot set)
    ADAPTERHUB_IDLE_SECONDS=600                      unload an adapter unused this long
    ADAPTERHUB_TRUSTED_KEYS=key1.pem:key2.pem        when set, bundles must be signed by one of these
    ADAPTERHUB_WARMUP=1                              0: /health is ready without the LoRA warm-up
    ADAPTERHUB_HEAP_TRIM=1                           0: vLLM's worker keeps freed heap pages (see plugin.py)
    ADAPTERHUB_RATE_LIMIT_URL=redis://host:6379/0    per-tenant limits shared by every replica (unset:
                                                     in-process, per API-server process)
    ADAPTERHUB_RATE_LIMIT_FAILURE=open               Redis unreachable: `open` admits, `closed` answers 503
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_PLUGINS=adapterhub
    python -m vllm.entrypoints.launchers.api_server.entry --model $ADAPTERHUB_BASE_DIR --enable-lora \
        --max-lora-rank 16 --max-loras 32 --max-cpu-loras 64 \
        --middleware adapterhub_lite.serving.middleware.TenancyMiddleware

(`adapterhub serve --print-command` prints the exact command; adapterhub_lite/vllm_compat/launch.py says
why this module.) These dataclass defaults are the one home of the serving defaults: `ServeOptions` and
the `serve` command's flags read them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from adapterhub_lite.errors import ErrorKind, ServingError
from adapterhub_lite.registry.config import ENV_REGISTRY

ENV_ADMIN_KEY = "ADAPTERHUB_ADMIN_KEY"
ENV_TENANTS_DB = "ADAPTERHUB_TENANTS_DB"  # the one home of this name (tenancy.py reads it)
ENV_BASE_DIR = "ADAPTERHUB_BASE_DIR"
ENV_SERVED_NAME = "ADAPTERHUB_SERVED_NAME"
ENV_CACHE_DIR = "ADAPTERHUB_CACHE_DIR"
ENV_CACHE_MAX_MB = "ADAPTERHUB_CACHE_MAX_MB"
ENV_MAX_LORA_RANK = "ADAPTERHUB_MAX_LORA_RANK"
ENV_MAX_LOADED = "ADAPTERHUB_MAX_LOADED"
ENV_IDLE_SECONDS = "ADAPTERHUB_IDLE_SECONDS"
ENV_TRUSTED_KEYS = "ADAPTERHUB_TRUSTED_KEYS"
ENV_WARMUP = "ADAPTERHUB_WARMUP"
ENV_HEAP_TRIM = "ADAPTERHUB_HEAP_TRIM"
ENV_RATE_LIMIT_URL = "ADAPTERHUB_RATE_LIMIT_URL"
ENV_RATE_LIMIT_FAILURE = "ADAPTERHUB_RATE_LIMIT_FAILURE"

DEFAULT_HOT_SET = 8  # hot set when neither ADAPTERHUB_MAX_LOADED nor --max-cpu-loras says

# Adapter slots when the command line does not say: (vLLM's --max-loras, --max-cpu-loras). On the CPU they
# come from benchmarks/results/serving_max_loras_sweep.json: there a slot costs only host memory, and
# fewer batch slots than adapters in flight leave requests waiting while the cores are idle. On a GPU a
# slot's stacked weights come out of the KV cache, so the small values stay (vLLM's own are 1 and
# --max-loras); the README's serving section says how to size them.
CPU_LORA_SLOTS = (32, 64)
GPU_LORA_SLOTS = (4, 8)


def default_lora_slots(cpu: bool) -> tuple[int, int]:
    """(max_loras, max_cpu_loras) for a server on the CPU or on a GPU."""
    return CPU_LORA_SLOTS if cpu else GPU_LORA_SLOTS


def _int_env(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ServingError(
            f"{name}={raw!r} is not a whole number", hint=f"set {name} to e.g. 16", kind=ErrorKind.INVALID
        ) from None


def _flag(raw: str | None) -> bool:
    """An on/off variable: unset or anything but 0/false/no is on."""
    return (raw or "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass
class ServingConfig:
    """Everything the plugin and the middleware need to know about the server they run in."""

    admin_key: str | None = None
    tenants_db: str | None = None
    registry: str | None = None
    base_dir: str | None = None
    served_name: str | None = None
    cache_dir: str = str(Path.home() / ".adapterhub" / "serve-cache")
    cache_max_mb: int = 2048
    max_lora_rank: int | None = None
    max_loaded: int | None = None  # None: vLLM's --max-cpu-loras (the launcher knows it)
    idle_seconds: int = 600
    trusted_keys: list[str] = field(default_factory=list)
    warmup: bool = True
    heap_trim: bool = True
    rate_limit_url: str | None = None  # redis://...: one bucket per tenant across replicas
    rate_limit_failure: str = "open"  # what limits do while Redis is unreachable: open or closed

    def hot_set_size(self) -> int:
        """Adapters kept loaded in vLLM at most."""
        return self.max_loaded or DEFAULT_HOT_SET

    @classmethod
    def from_env(cls) -> ServingConfig:
        """Read the ADAPTERHUB_* variables."""
        env = os.environ
        keys = [k for k in env.get(ENV_TRUSTED_KEYS, "").split(os.pathsep) if k]
        return cls(
            admin_key=env.get(ENV_ADMIN_KEY) or None,
            tenants_db=env.get(ENV_TENANTS_DB) or None,
            registry=env.get(ENV_REGISTRY) or None,
            base_dir=env.get(ENV_BASE_DIR) or None,
            served_name=env.get(ENV_SERVED_NAME) or None,
            cache_dir=env.get(ENV_CACHE_DIR) or cls.cache_dir,
            cache_max_mb=_int_env(ENV_CACHE_MAX_MB, cls.cache_max_mb) or cls.cache_max_mb,
            max_lora_rank=_int_env(ENV_MAX_LORA_RANK, None),
            max_loaded=_int_env(ENV_MAX_LOADED, None) or None,
            idle_seconds=_int_env(ENV_IDLE_SECONDS, cls.idle_seconds) or cls.idle_seconds,
            trusted_keys=keys,
            warmup=_flag(env.get(ENV_WARMUP)),
            heap_trim=_flag(env.get(ENV_HEAP_TRIM)),
            rate_limit_url=env.get(ENV_RATE_LIMIT_URL) or None,
            rate_limit_failure=env.get(ENV_RATE_LIMIT_FAILURE) or cls.rate_limit_failure,
        )

    def to_env(self) -> dict[str, str]:
        """The environment that makes a vLLM process read this configuration back."""
        pairs = {
            ENV_ADMIN_KEY: self.admin_key,
            ENV_TENANTS_DB: self.tenants_db,
            ENV_REGISTRY: self.registry,
            ENV_BASE_DIR: self.base_dir,
            ENV_SERVED_NAME: self.served_name,
            ENV_CACHE_DIR: self.cache_dir,
            ENV_CACHE_MAX_MB: str(self.cache_max_mb),
            ENV_MAX_LORA_RANK: None if self.max_lora_rank is None else str(self.max_lora_rank),
            ENV_MAX_LOADED: None if self.max_loaded is None else str(self.max_loaded),
            ENV_IDLE_SECONDS: str(self.idle_seconds),
            ENV_TRUSTED_KEYS: os.pathsep.join(self.trusted_keys) if self.trusted_keys else None,
            ENV_WARMUP: "1" if self.warmup else "0",
            ENV_HEAP_TRIM: "1" if self.heap_trim else "0",
            ENV_RATE_LIMIT_URL: self.rate_limit_url,
            ENV_RATE_LIMIT_FAILURE: self.rate_limit_failure if self.rate_limit_url else None,
        }
        return {k: v for k, v in pairs.items() if v is not None}
