"""Every `ADAPTERHUB_*` setting in one place: its name, type, default and meaning.

Settings come from the environment, so that any process of a server (the CLI, vLLM's API server, its
engine and workers) reads the same values; the CLI's flags override them where a command has one.
`settings()` reads the environment afresh on each call (launchers and tests change it). One grammar for
every on/off setting: `1/0`, `true/false`, `yes/no`, `on/off` (any case); anything else is an error that
names the variable. An empty value counts as unset. The reference page in the docs is generated from
this module (`scripts/gen_reference.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapterhub_lite.errors import AdapterHubError, ErrorKind

PREFIX = "ADAPTERHUB_"
# Where adapterhub keeps its state unless told otherwise (registry, tenant store, caches, hub token).
STATE_DIR_NAME = ".adapterhub"
# Default ports: a vLLM server speaks OpenAI on 8000 (vLLM's own default); the hub sits beside it.
SERVE_PORT = 8000
HUB_PORT = 8100


def state_dir() -> Path:
    """`~/.adapterhub`: the default home of the registry, the tenant store and the caches."""
    return Path.home() / STATE_DIR_NAME


def config_dir() -> Path:
    """The user's signing keys and trust: `$ADAPTERHUB_CONFIG_DIR`, else the platform's user config
    directory (`$XDG_CONFIG_HOME/adapterhub`, `~/.config/adapterhub` on Linux)."""
    if configured := settings().config_dir:
        return Path(configured).expanduser()
    return platformdirs.user_config_path("adapterhub")


class SettingsError(AdapterHubError):
    """An `ADAPTERHUB_*` variable holds a value of the wrong kind."""

    default_kind = ErrorKind.INVALID


class Settings(BaseSettings):
    """The `ADAPTERHUB_*` environment, typed. Field `cache_dir` is the variable `ADAPTERHUB_CACHE_DIR`."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, env_ignore_empty=True, extra="ignore", case_sensitive=False
    )

    # -- where things are ------------------------------------------------------------------------
    registry: str | None = Field(
        None,
        description="the registry: a folder, `sqlite:///…`, `postgresql://…` or a hub URL "
        "(default `~/.adapterhub/registry`)",
    )
    blobs: str | None = Field(
        None, description="where a new registry stores its files: a folder or any fsspec URL (s3://…)"
    )
    tenants_db: str | None = Field(
        None,
        description="the tenant store: a path, `sqlite:///…` or `postgresql://…` "
        "(default `~/.adapterhub/tenants.db`)",
    )
    hub_tokens_db: str | None = Field(
        None, description="the hub's token store (default: beside the registry it serves)"
    )
    config_dir: str | None = Field(
        None, description="the user's signing keys and trust (default `$XDG_CONFIG_HOME/adapterhub`)"
    )
    cache_dir: str | None = Field(
        None, description="a server's verified-bundle cache on disk (default `~/.adapterhub/serve-cache`)"
    )
    base_dir: str | None = Field(
        None, description="the base model a server serves (bundles must pin its fingerprint)"
    )
    # -- credentials -----------------------------------------------------------------------------
    admin_key: str | None = Field(
        None, description="a server's admin key: load/unload and the `/adapterhub/*` admin routes"
    )
    token: str | None = Field(
        None, description="a hub token for publishing and private reads (else the saved `adapterhub login`)"
    )
    trusted_keys: str | None = Field(
        None,
        description="public key files, separated by the path separator: bundles must carry a "
        "signature by one of them",
    )
    allow_http_token: bool = Field(
        False, description="on: a hub token may travel over plain http to a host that is not this machine"
    )
    namespace: str | None = Field(None, description="the namespace `pack` uses when a recipe names none")
    # -- serving ---------------------------------------------------------------------------------
    served_name: str | None = Field(None, description="the base model's name as vLLM serves it")
    cache_max_mb: int = Field(2048, gt=0, description="the disk cache's bound, in MiB")
    compile_cache_dir: str | None = Field(
        None, description="where torch keeps what it compiles for vLLM (default: `.compile` in the cache)"
    )
    max_lora_rank: int | None = Field(None, gt=0, description="= vLLM's `--max-lora-rank`")
    max_loaded: int | None = Field(
        None, gt=0, description="adapters kept loaded in vLLM, the hot set (default: `--max-cpu-loras`)"
    )
    idle_seconds: int = Field(600, gt=0, description="unload an adapter unused this long")
    prefetch_seconds: float = Field(
        1.0, ge=0, description="how often the gateway looks for moved aliases to prefetch (0: never)"
    )
    drain_seconds: int = Field(
        20, ge=0, description="at a stop, requests in flight get this long to finish (0: cut at once)"
    )
    warmup: bool = Field(True, description="off: `/health` says ready without the LoRA warm-up")
    warmup_hold: str | None = Field(
        None,
        description="a test hook: the warm-up ends only once this file exists, so the 503 while warming up "
        "can be asked for at leisure",
    )
    heap_trim: bool = Field(True, description="off: vLLM's worker keeps freed heap pages after LoRA changes")
    kv_zeroing: bool = Field(
        True, description="off: new KV-cache blocks are not zeroed (one request's NaN may reach another's)"
    )
    cpu_lora_ops: bool = Field(True, description="off: vLLM's own CPU LoRA ops instead of the grouped ones")
    rate_limit_url: str | None = Field(
        None, description="`redis://…`: per-tenant limits shared by every replica (unset: per process)"
    )
    rate_limit_failure: Literal["open", "closed"] = Field(
        "open", description="Redis unreachable: `open` admits requests, `closed` answers 503"
    )
    db_silence_seconds: float = Field(
        10.0,
        gt=0,
        description="PostgreSQL silent this long (a probe unanswered: a partition, a frozen server) counts "
        "as down: requests get 503 until it answers again",
    )
    metrics_max_adapters: int = Field(
        1000, ge=1, description="adapters with Prometheus series of their own; later ones count as `other`"
    )
    # -- the usage ledger ------------------------------------------------------------------------
    usage_ledger: bool = Field(True, description="off: answered requests are not recorded in the ledger")
    usage_flush_seconds: float = Field(
        1.0, ge=0.01, description="the ledger writer's batch window; a crash loses at most this much"
    )
    usage_queue: int = Field(
        10_000, ge=1, description="ledger rows held in memory at most; beyond, rows are dropped and counted"
    )
    usage_retention_days: int = Field(35, ge=1, description="raw ledger rows kept, then rolled up per day")
    usage_daily_days: int = Field(800, ge=1, description="daily ledger roll-ups kept")
    # -- traces ----------------------------------------------------------------------------------
    otlp_endpoint: str | None = Field(
        None,
        description="an OTLP/HTTP collector (`http://host:4318`): the gateway's request spans go to its "
        "`/v1/traces`, and vLLM's own too (unset: tracing off)",
    )
    otlp_sample_ratio: float = Field(
        1.0, ge=0.0, le=1.0, description="the share of new traces recorded (a caller's `traceparent` decides "
        "for its own)"
    )
    # -- diagnostics -----------------------------------------------------------------------------
    lora_trace: bool = Field(False, description="log each adapter that enters a vLLM slot, with counts")
    memory_probe: str | None = Field(
        None, description="a JSONL file: memory reports from vLLM's worker and engine core"
    )
    memory_probe_every: int = Field(200, gt=0, description="requests between the engine core's reports")
    memory_probe_tracemalloc: int = Field(0, ge=0, description="frames kept by tracemalloc (0: off)")
    parent_pid: int | None = Field(
        None, description="set by the launcher: vLLM stops when this process is gone"
    )


def env_name(field: str) -> str:
    """The environment variable of a setting (`cache_max_mb` -> `ADAPTERHUB_CACHE_MAX_MB`)."""
    if field not in Settings.model_fields:
        raise KeyError(field)
    return PREFIX + field.upper()


def settings() -> Settings:
    """The settings as the environment holds them now; SettingsError names a bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first.get("loc") else "?"
        name = PREFIX + field.upper()
        raise SettingsError(
            f"{name}={first.get('input')!r} is not valid: {first.get('msg', 'bad value')}",
            hint=f"fix or unset {name} (see docs: reference/settings)",
        ) from None
