"""The serving settings, read from environment variables so that any `vllm serve` command line gets them.

`adapterhub serve` sets these for you. With your own vLLM command line, set them yourself (every
`ADAPTERHUB_*` variable, its default and meaning: `adapterhub_lite/settings.py`, the docs' settings
reference); at least `ADAPTERHUB_ADMIN_KEY`, `ADAPTERHUB_TENANTS_DB`, `ADAPTERHUB_REGISTRY` and
`ADAPTERHUB_BASE_DIR`, then:

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_PLUGINS=adapterhub
    python -m vllm.entrypoints.launchers.api_server.entry --model $ADAPTERHUB_BASE_DIR --enable-lora \
        --max-lora-rank 16 --max-loras 32 --max-cpu-loras 64 \
        --middleware adapterhub_lite.serving.gateway.middleware.TenancyMiddleware

(`adapterhub serve --print-command` prints the exact command; adapterhub_lite/vllm_compat/launch.py says
why this module.) These dataclass defaults are the one home of the serving defaults: `ServeOptions` and
the `serve` command's flags read them, and they are the settings module's own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from adapterhub_lite.registry.config import ENV_REGISTRY
from adapterhub_lite.settings import Settings, env_name, settings, state_dir

ENV_ADMIN_KEY = env_name("admin_key")
ENV_TENANTS_DB = env_name("tenants_db")
ENV_BASE_DIR = env_name("base_dir")
ENV_SERVED_NAME = env_name("served_name")
ENV_CACHE_DIR = env_name("cache_dir")
ENV_CACHE_MAX_MB = env_name("cache_max_mb")
ENV_MAX_LORA_RANK = env_name("max_lora_rank")
ENV_MAX_LOADED = env_name("max_loaded")
ENV_IDLE_SECONDS = env_name("idle_seconds")
ENV_PREFETCH_SECONDS = env_name("prefetch_seconds")
ENV_TRUSTED_KEYS = env_name("trusted_keys")
ENV_WARMUP = env_name("warmup")
ENV_HEAP_TRIM = env_name("heap_trim")
ENV_RATE_LIMIT_URL = env_name("rate_limit_url")
ENV_RATE_LIMIT_FAILURE = env_name("rate_limit_failure")
ENV_OTLP_ENDPOINT = env_name("otlp_endpoint")
ENV_OTLP_SAMPLE_RATIO = env_name("otlp_sample_ratio")

# The settings' defaults, so a config made in code and one read from the environment agree.
_DEFAULT = {name: f.default for name, f in Settings.model_fields.items()}

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


@dataclass
class ServingConfig:
    """Everything the plugin and the middleware need to know about the server they run in."""

    admin_key: str | None = None
    tenants_db: str | None = None
    registry: str | None = None
    base_dir: str | None = None
    served_name: str | None = None
    cache_dir: str = str(state_dir() / "serve-cache")
    cache_max_mb: int = _DEFAULT["cache_max_mb"]
    max_lora_rank: int | None = None
    max_loaded: int | None = None  # None: vLLM's --max-cpu-loras (the launcher knows it)
    idle_seconds: int = _DEFAULT["idle_seconds"]
    prefetch_seconds: float = _DEFAULT["prefetch_seconds"]  # 0: moved aliases are not prefetched
    trusted_keys: list[str] = field(default_factory=list)
    warmup: bool = _DEFAULT["warmup"]
    heap_trim: bool = _DEFAULT["heap_trim"]
    rate_limit_url: str | None = None  # redis://...: one bucket per tenant across replicas
    rate_limit_failure: str = _DEFAULT["rate_limit_failure"]  # Redis unreachable: open or closed
    otlp_endpoint: str | None = None  # an OTLP/HTTP collector: traces on (serving/tracing.py)
    otlp_sample_ratio: float = _DEFAULT["otlp_sample_ratio"]

    def hot_set_size(self) -> int:
        """Adapters kept loaded in vLLM at most."""
        return self.max_loaded or DEFAULT_HOT_SET

    @classmethod
    def from_env(cls) -> ServingConfig:
        """Read the ADAPTERHUB_* variables (`adapterhub_lite.settings`)."""
        env = settings()
        return cls(
            admin_key=env.admin_key,
            tenants_db=env.tenants_db,
            registry=env.registry,
            base_dir=env.base_dir,
            served_name=env.served_name,
            cache_dir=env.cache_dir or str(state_dir() / "serve-cache"),
            cache_max_mb=env.cache_max_mb,
            max_lora_rank=env.max_lora_rank,
            max_loaded=env.max_loaded,
            idle_seconds=env.idle_seconds,
            prefetch_seconds=env.prefetch_seconds,
            trusted_keys=[k for k in (env.trusted_keys or "").split(os.pathsep) if k],
            warmup=env.warmup,
            heap_trim=env.heap_trim,
            rate_limit_url=env.rate_limit_url,
            rate_limit_failure=env.rate_limit_failure,
            otlp_endpoint=env.otlp_endpoint,
            otlp_sample_ratio=env.otlp_sample_ratio,
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
            ENV_PREFETCH_SECONDS: str(self.prefetch_seconds),
            ENV_TRUSTED_KEYS: os.pathsep.join(self.trusted_keys) if self.trusted_keys else None,
            ENV_WARMUP: "1" if self.warmup else "0",
            ENV_HEAP_TRIM: "1" if self.heap_trim else "0",
            ENV_RATE_LIMIT_URL: self.rate_limit_url,
            ENV_RATE_LIMIT_FAILURE: self.rate_limit_failure if self.rate_limit_url else None,
            ENV_OTLP_ENDPOINT: self.otlp_endpoint,
            # The default is left unwritten, so a ratio in the launching environment reaches vLLM's processes.
            ENV_OTLP_SAMPLE_RATIO: None
            if self.otlp_sample_ratio == _DEFAULT["otlp_sample_ratio"]
            else str(self.otlp_sample_ratio),
        }
        return {k: v for k, v in pairs.items() if v is not None}
