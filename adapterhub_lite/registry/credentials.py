"""A hub client's token: `$ADAPTERHUB_TOKEN`, else the one `adapterhub login` stored for that hub.

A stored token belongs to the hub it was checked against at login: it is never sent to another hub.
Nor is any token sent in clear text: over plain `http://` only to a loopback address, unless the user
says so (`ADAPTERHUB_ALLOW_HTTP_TOKEN=1`), since anything on the path could read and reuse it.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from adapterhub_lite import atomic
from adapterhub_lite.bundles.signing import config_dir
from adapterhub_lite.errors import ErrorKind, RegistryError
from adapterhub_lite.settings import env_name, settings

ENV_TOKEN = env_name("token")
ENV_ALLOW_HTTP = env_name("allow_http_token")
TOKEN_FILE = "hub-tokens.json"


def token_path() -> Path:
    return config_dir() / TOKEN_FILE


def hub_key(hub: str) -> str:
    """How a hub URL is stored: scheme, host and port lower-cased, path without a trailing slash."""
    u = urlsplit(hub.strip())
    if u.scheme not in ("http", "https") or not u.hostname:
        raise RegistryError(
            f"not a hub URL: {hub[:200]!r}", hint="use http(s)://HOST[:PORT]", kind=ErrorKind.INVALID
        )
    port = f":{u.port}" if u.port else ""
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"{u.scheme}://{host}{port}{u.path.rstrip('/')}"


def is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_transport(hub: str) -> None:
    """Refuse to send a bearer token to `hub` over plain http unless it is on this machine (or told to)."""
    u = urlsplit(hub)
    if u.scheme != "http" or is_loopback_host(u.hostname or ""):
        return
    if settings().allow_http_token:
        return
    raise RegistryError(
        f"refusing to send a token to {u.hostname} over plain http: anything on the path could read it",
        hint=f"use the hub's https:// address, or set {ENV_ALLOW_HTTP}=1 if the path is trusted",
        kind=ErrorKind.INVALID,
    )


def _stored() -> dict[str, Any]:
    path = token_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_token(token: str, hub: str) -> Path:
    """Store a token for `hub` in a file only its owner can read."""
    path = token_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = _stored()
    data.pop("default", None)  # a token for every hub, from before tokens were bound to one
    hubs = data.get("hubs") if isinstance(data.get("hubs"), dict) else {}
    hubs[hub_key(hub)] = token
    data["hubs"] = hubs
    atomic.write_json(path, data)  # its temporary file is made by mkstemp: mode 0600 from the start
    return path


def load_token(hub: str) -> str | None:
    """`$ADAPTERHUB_TOKEN`, else the token stored for exactly this hub (never another hub's)."""
    if configured := settings().token:
        return configured.strip()
    hubs = _stored().get("hubs")
    if not isinstance(hubs, dict):
        return None
    try:
        token = hubs.get(hub_key(hub))
    except RegistryError:
        return None
    return token if isinstance(token, str) else None
