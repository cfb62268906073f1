"""Start vLLM's OpenAI server with the adapterhub plugin, wait until it is healthy, stop it cleanly.

    with VLLMServer(ServeOptions(base_dir=..., admin_key=...)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=tenant_key)

The CPU build of vLLM needs a small KV-cache reservation and float32 (see STACK.md); `cpu_defaults()`
holds those. The plugin is enabled by `VLLM_PLUGINS=adapterhub` and runtime LoRA updating, and the
tenancy middleware by `--middleware`; `ServingConfig.to_env()` passes the rest.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from adapterhub_lite.errors import ServingError
from adapterhub_lite.serving.config import ServingConfig

MIDDLEWARE = "adapterhub_lite.serving.middleware.TenancyMiddleware"
PLUGIN_NAME = "adapterhub"
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_cpu() -> bool:
    """True when this vLLM is the CPU build (or no GPU is visible)."""
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        return True


@dataclass
class ServeOptions:
    """How to launch the server; the fields mirror `adapterhub serve`'s flags."""

    base_dir: str
    served_name: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int = 8
    max_model_len: int = 512
    registry: str | None = None
    tenants_db: str | None = None
    admin_key: str | None = None
    cache_dir: str | None = None
    cache_max_mb: int = 2048
    max_loaded: int | None = None  # default: max_cpu_loras
    idle_seconds: int = 600
    trusted_keys: list[str] = field(default_factory=list)
    plugin: bool = True  # False: plain vLLM (the benchmark's baseline)
    lora: bool = True
    lora_modules: dict[str, str] = field(default_factory=dict)  # name -> PEFT dir, preloaded
    extra_args: list[str] = field(default_factory=list)
    log_path: str | None = None

    def serving_config(self) -> ServingConfig:
        cfg = ServingConfig(
            admin_key=self.admin_key,
            tenants_db=self.tenants_db,
            registry=self.registry,
            base_dir=self.base_dir,
            served_name=self.served_name,
            cache_max_mb=self.cache_max_mb,
            max_lora_rank=self.max_lora_rank,
            max_loaded=self.max_loaded or self.max_cpu_loras,
            idle_seconds=self.idle_seconds,
            trusted_keys=list(self.trusted_keys),
        )
        if self.cache_dir:
            cfg.cache_dir = self.cache_dir
        return cfg


def cpu_defaults() -> tuple[dict[str, str], list[str]]:
    """Environment and flags the CPU build needs (measured: larger KV reservations or bf16 crash)."""
    return {"VLLM_CPU_KVCACHE_SPACE": "1"}, ["--dtype", "float32", "--gpu-memory-utilization", "0.3"]


def build_command(opts: ServeOptions) -> tuple[list[str], dict[str, str]]:
    """The vLLM command line and the environment additions for `opts`."""
    if opts.max_lora_rank not in VLLM_RANKS:
        raise ServingError(
            f"--max-lora-rank {opts.max_lora_rank} is not one vLLM accepts",
            hint=f"choose one of {', '.join(map(str, VLLM_RANKS))}",
        )
    if opts.lora and opts.max_cpu_loras < opts.max_loras:
        raise ServingError(
            f"--max-cpu-loras ({opts.max_cpu_loras}) must be at least --max-loras ({opts.max_loras})",
            hint="vLLM keeps every adapter of a batch in its CPU cache too",
        )
    from adapterhub_lite.base import resolve_base_dir

    base = resolve_base_dir(opts.base_dir)
    served = opts.served_name or base.name
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(base),
        "--served-model-name",
        served,
        "--host",
        opts.host,
        "--port",
        str(opts.port),
        "--max-model-len",
        str(opts.max_model_len),
        "--uvicorn-log-level",
        "warning",
    ]
    env: dict[str, str] = {}
    if on_cpu():
        cpu_env, cpu_args = cpu_defaults()
        env.update(cpu_env)
        cmd += cpu_args
    if opts.lora:
        cmd += [
            "--enable-lora",
            "--max-loras",
            str(opts.max_loras),
            "--max-lora-rank",
            str(opts.max_lora_rank),
            "--max-cpu-loras",
            str(opts.max_cpu_loras),
        ]
        if opts.lora_modules:
            cmd += ["--lora-modules", *(f"{n}={p}" for n, p in opts.lora_modules.items())]
    if opts.plugin:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env["VLLM_PLUGINS"] = PLUGIN_NAME
        cmd += ["--middleware", MIDDLEWARE]
        cfg = opts.serving_config()
        cfg.base_dir = str(base)
        cfg.served_name = served
        env.update(cfg.to_env())
    else:
        # Plain vLLM: no adapterhub plugin, even though it is installed.
        env["VLLM_PLUGINS"] = ""
    cmd += opts.extra_args
    return cmd, env


class VLLMServer:
    """A vLLM API server in a child process; a context manager that starts it and always stops it."""

    def __init__(self, opts: ServeOptions, *, startup_timeout: float = 300.0) -> None:
        self.opts = opts
        if opts.port is None:
            opts.port = free_port()
        if opts.plugin and not opts.admin_key:
            opts.admin_key = "ahadmin_" + secrets.token_urlsafe(24)
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.command, self.env = build_command(opts)  # bad options fail here, before anything starts
        self.log_path = (
            Path(opts.log_path)
            if opts.log_path
            else Path(tempfile.gettempdir(), f"adapterhub-vllm-{opts.port}.log")
        )

    @property
    def url(self) -> str:
        """http://host:port (add /v1 for the OpenAI client)."""
        return f"http://{self.opts.host}:{self.opts.port}"

    @property
    def admin_key(self) -> str | None:
        return self.opts.admin_key

    def start(self) -> VLLMServer:
        """Launch and block until /health answers 200 (ServingError with the log's tail if it dies)."""
        cmd, env = self.command, {**os.environ, **self.env}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._close_log()
                raise ServingError(
                    f"vLLM exited with code {self.process.returncode} while starting:\n{self.log_tail()}",
                    hint=f"full log: {self.log_path}",
                )
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise ServingError(
            f"vLLM did not become healthy within {self.startup_timeout:.0f} s:\n{self.log_tail()}",
            hint=f"full log: {self.log_path}",
        )

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT (vLLM's clean shutdown), then SIGKILL to the whole process group if it lingers."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # engine-core children, if any survived
        except ProcessLookupError:
            pass
        proc.wait()
        self.process = None
        self._close_log()

    def _close_log(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
