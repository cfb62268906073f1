"""The hub: the registry as an HTTP service (API, namespace-scoped tokens, a server-rendered web catalog).

`create_app(registry, HubConfig(...))` is the ASGI app; `serve(...)` runs it with uvicorn. Clients do not
import this package: they speak HTTP through `adapterhub_lite.registry.remote`.
"""

from __future__ import annotations

from pathlib import Path

from adapterhub_lite.hub.app import HubConfig, create_app, state_dir_for
from adapterhub_lite.hub.server import Limits, exposure_warning, uvicorn_config
from adapterhub_lite.hub.tokens import ENV_TOKENS_DB, SCOPES, TOKENS_FILE, HubError, TokenInfo, TokenStore
from adapterhub_lite.settings import settings

__all__ = [
    "ENV_TOKENS_DB",
    "SCOPES",
    "HubConfig",
    "HubError",
    "Limits",
    "TokenInfo",
    "TokenStore",
    "create_app",
    "exposure_warning",
    "known_bases",
    "serve",
    "state_dir_for",
    "token_store",
    "uvicorn_config",
]


def _state_dir(registry_location: str | Path | None, state_dir: str | Path | None) -> Path:
    if state_dir is not None:
        return Path(state_dir)
    raw = str(registry_location or "")
    if raw.startswith("file://"):
        raw = raw[len("file://") :]
    if not raw or "://" in raw:
        raise HubError(
            f"the registry {raw or '(none)'} is not a directory, so the hub has no default state folder",
            hint="pass --state DIR (tokens and uploads live there)",
        )
    return state_dir_for(Path(raw).expanduser())


def token_store(
    registry_location: str | Path | None,
    state_dir: str | Path | None = None,
    tokens_db: str | None = None,
) -> TokenStore:
    """The token store of the hub over `registry_location`: the database `tokens_db` (a path or a
    `postgresql://` URL; default `$ADAPTERHUB_HUB_TOKENS_DB`), else a SQLite file in its state folder."""
    location = tokens_db or settings().hub_tokens_db
    return TokenStore(location or _state_dir(registry_location, state_dir) / TOKENS_FILE)


def known_bases(dirs: list[str | Path]) -> dict[str, Path]:
    """fingerprint -> directory of each base model directory (for `HubConfig.bases`)."""
    from adapterhub_lite.base import fingerprint, resolve_base_dir

    out = {}
    for d in dirs:
        path = resolve_base_dir(d)
        out[fingerprint(path)] = Path(path)
    return out


def serve(
    registry_location: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    state_dir: str | Path | None = None,
    tokens_db: str | None = None,
    bases: list[str | Path] | None = None,
    max_upload: int | None = None,
    public_url: str = "",
    limits: Limits | None = None,
    log_level: str = "warning",
) -> None:
    """Run the hub over the registry at `registry_location` until interrupted."""
    import uvicorn

    from adapterhub_lite.registry import open_registry

    state = _state_dir(registry_location, state_dir)
    registry = open_registry(registry_location)
    config = HubConfig(
        state_dir=state,
        public_url=public_url,
        tokens_db=tokens_db or settings().hub_tokens_db,
        bases=known_bases(bases or []),
    )
    if max_upload is not None:
        config.max_upload = max_upload
    app = create_app(registry, config)
    _warm_vllm_validator()
    uvicorn.Server(uvicorn_config(app, host, port, limits or Limits(), log_level)).run()


def _warm_vllm_validator() -> None:
    """Import vLLM's validator in the background: the first publish would otherwise wait for it."""
    import threading

    from adapterhub_lite.bundles import compat

    if compat.vllm_available():
        probe = {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "peft_type": "LORA"}
        threading.Thread(target=compat.vllm_refusal, args=(probe, None), daemon=True).start()
