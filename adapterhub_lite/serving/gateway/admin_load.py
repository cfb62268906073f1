"""The admin's `/v1/load_lora_adapter`: a raw PEFT directory is checked as a bundle is, before vLLM loads it.

Adapters normally reach vLLM through the resolver, which verifies a signed bundle. The admin can also
name a directory on the server directly (vLLM's own route, passed on by the middleware); without this,
that directory was loaded unscanned. Before the request is passed on, the directory must hold a PEFT
config and safetensors weights (no pickles: vLLM would unpickle them), the config, tensors and served
base must agree (`bundles.compat.check_adapter` with the base's shapes and the server's max rank) and the
weights must be finite (`bundles.values.scan_file`). A refusal is one line naming the file and field,
status 422 (kind INVALID); a server that does not know its base answers 503 rather than load unchecked.

The check and vLLM's read of the files are separate opens, so a directory changed in between is not
covered here; vLLM's worker makes an adapter with non-finite weights inert whatever path it came by
(`vllm_compat/isolation.py`).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from adapterhub_lite.display import safe
from adapterhub_lite.errors import AdapterHubError, BundleError, ErrorKind
from adapterhub_lite.serving.gateway.admin_state import AdminState
from adapterhub_lite.serving.gateway.asgi import (
    BodyRefused,
    Receive,
    Scope,
    Send,
    read_body,
    replay_body,
    send_error,
    send_project_error,
)

logger = logging.getLogger("adapterhub.serving")

LOAD_LORA_PATH = "/v1/load_lora_adapter"
_MAX_REQUEST_BYTES = 64 * 1024
_FIX = "pass a PEFT adapter directory on the server (adapter_config.json + adapter_model.safetensors)"


def lora_path_of(body: bytes) -> str:
    """The `lora_path` of a load request's JSON body; BundleError when the body is not one."""
    from adapterhub_lite.bundles.manifest import load_json_bounded

    request = load_json_bounded(body, "request body", max_bytes=_MAX_REQUEST_BYTES, max_depth=8, hint=_FIX)
    path = request.get("lora_path") if isinstance(request, dict) else None
    if not isinstance(path, str) or not path:
        raise BundleError('request body: "lora_path" must be a string', hint=_FIX, kind=ErrorKind.INVALID)
    return path


def check_adapter_dir(
    adapter_dir: str | Path, base_dir: str | Path, max_lora_rank: int | None = None
) -> list[str]:
    """Check a PEFT directory as a bundle is checked for serving on `base_dir`; the warning lines.

    Raises BundleError (one line, naming the file and field) for a path that is not a local directory,
    pickled weights, config/tensors/base disagreement, a rank over `max_lora_rank`, or NaN/Inf weights.
    """
    from adapterhub_lite.bundles.adapter_config import CONFIG_FILE, parse_config
    from adapterhub_lite.bundles.compat import WEIGHTS_FILE, base_weight_shapes, check_adapter, refuse_pickles
    from adapterhub_lite.bundles.tensors import header_length, parse_header
    from adapterhub_lite.bundles.values import scan_file

    adapter_dir = Path(adapter_dir)
    label = safe(str(adapter_dir))
    if not adapter_dir.is_absolute() or not adapter_dir.is_dir():
        # vLLM would take anything else for a model hub id and try to download it.
        raise BundleError(
            f"lora_path {label}: not an absolute path to a directory on the server",
            hint=_FIX,
            kind=ErrorKind.INVALID,
        )
    names = [p.name for p in adapter_dir.iterdir() if p.is_file()]
    refuse_pickles(names, label)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if name not in names:
            raise BundleError(f"{label}: no {name}", hint=_FIX, kind=ErrorKind.INVALID)
    config_path, weights_path = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
    config = parse_config(config_path.read_bytes(), safe(str(config_path)))
    size = weights_path.stat().st_size
    with weights_path.open("rb") as f:
        prefix = f.read(8)
        prefix += f.read(header_length(prefix, size, safe(str(weights_path))))
    tensors, _ = parse_header(prefix, size, safe(str(weights_path)))
    check_adapter(
        config,
        tensors,
        base_shapes=base_weight_shapes(Path(base_dir)),
        base_label="the served base",
        max_lora_rank=max_lora_rank,
        config_label=safe(str(config_path)),
        weights_label=safe(str(weights_path)),
    )
    return scan_file(weights_path, safe(str(weights_path))).warnings(safe(str(weights_path)))


async def admin_load_lora(mw: AdminState, scope: Scope, receive: Receive, send: Send) -> None:
    """Check the directory an admin asks vLLM to load, then pass the request on unchanged (or refuse)."""
    try:
        body = await read_body(receive, scope, limit=_MAX_REQUEST_BYTES)
    except BodyRefused as exc:
        await send_error(send, exc.status, exc.message, "BadRequestError")
        return
    try:
        path = lora_path_of(body)
        base_dir = await asyncio.to_thread(mw.resolver.base_dir)
        warnings = await asyncio.to_thread(check_adapter_dir, path, base_dir, mw.config.max_lora_rank)
    except AdapterHubError as exc:
        mw.metrics.rejected.labels("admin", "unchecked_adapter").inc()
        logger.warning("adapterhub: admin load refused: %s", exc.message)
        await send_project_error(send, exc, exc.message, param="lora_path")
        return
    for line in warnings:
        logger.warning("adapterhub: admin load: %s", line)
    await mw.app(scope, replay_body(body, receive), send)
