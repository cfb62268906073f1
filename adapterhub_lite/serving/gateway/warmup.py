"""Warm the server up before it says it is ready: one tiny request through a LoRA slot.

The first batch that holds an adapter makes vLLM's CPU build compile its LoRA kernels (a one-time
C++ compile of many seconds), so without this the first tenant request pays for it. The middleware
answers `/health` with 503 until the warm-up is done; the warm-up adapter has zero weights (rank 1
on one projection of the served base), is loaded under a name no tenant can use and unloaded after.
`ADAPTERHUB_WARMUP_HOLD` (a test hook) holds the end of the warm-up until a file exists, so that the
503 can be requested for certain.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from adapterhub_lite.atomic import write_json
from adapterhub_lite.serving.config import ServingConfig
from adapterhub_lite.serving.gateway.asgi import App, Message
from adapterhub_lite.serving.gateway.forwarding import scope_for
from adapterhub_lite.settings import settings
from adapterhub_lite.vllm_compat.server import Engine

logger = logging.getLogger("adapterhub.serving")

WARMUP_ADAPTER = "adapterhub-warmup"
_TARGETS = ("q_proj", "c_attn", "qkv_proj", "query_key_value", "Wqkv")


def write_warmup_adapter(base_dir: Path, dest: Path) -> Path:
    """A zero-weight rank-1 PEFT adapter for `base_dir` in `dest` (rewritten each time; a few KB)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    shapes: dict[str, list[int]] = {}
    for weights in sorted(Path(base_dir).glob("*.safetensors")):  # headers only: no tensor is read
        with safe_open(str(weights), "pt") as f:
            shapes.update({name: f.get_slice(name).get_shape() for name in f.keys()})  # noqa: SIM118
    module = next(
        (
            name[: -len(".weight")]
            for name, shape in sorted(shapes.items())
            if name.endswith(".weight") and len(shape) == 2 and name.split(".")[-2] in _TARGETS
        ),
        None,
    )
    if module is None:
        raise ValueError(f"no projection named one of {', '.join(_TARGETS)} in {base_dir}")
    out_features, in_features = shapes[module + ".weight"]
    dest.mkdir(parents=True, exist_ok=True)
    prefix = "base_model.model." + module
    save_file(
        {
            prefix + ".lora_A.weight": torch.zeros(1, in_features),
            prefix + ".lora_B.weight": torch.zeros(out_features, 1),
        },
        str(dest / "adapter_model.safetensors"),
    )
    write_json(
        dest / "adapter_config.json",
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": 1,
            "lora_alpha": 1,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "target_modules": [module.split(".")[-1]],
            "base_model_name_or_path": Path(base_dir).name,
        },
    )
    return dest


def load_body(path: Path) -> bytes:
    return json.dumps({"lora_name": WARMUP_ADAPTER, "lora_path": str(path)}).encode()


def completion_body() -> bytes:
    # Token ids, not text: no tokenizer assumptions. Two tokens: prefill and one decode step. With
    # logprobs: vLLM's sampler ranks them with a torch.compile'd kernel, built on first use (a C++
    # compile of many seconds that stalls the engine for every tenant): here, before ready, instead.
    return json.dumps(
        {"model": WARMUP_ADAPTER, "prompt": [1, 2, 3, 4], "max_tokens": 2, "temperature": 0, "logprobs": 1}
    ).encode()


async def warm_up(inner: App, app: Any, config: ServingConfig) -> None:
    """Load the warm-up adapter through vLLM's own route (`inner`, the app below the middleware; `app`,
    the application whose state vLLM set up), run one completion through it, unload it. Never raises."""
    started = time.monotonic()
    try:
        if app is None or not config.base_dir:
            return
        from adapterhub_lite.base import resolve_base_dir

        where = Path(config.cache_dir).expanduser() / ".warmup"
        path = await asyncio.to_thread(write_warmup_adapter, resolve_base_dir(config.base_dir), where)
        status, text = await _call(inner, app, "/v1/load_lora_adapter", load_body(path))
        if status != 200:
            logger.warning("adapterhub: warm-up adapter not loaded (%s): %s", status, text[:200])
            return
        status, text = await _call(inner, app, "/v1/completions", completion_body())
        if status != 200:
            logger.warning("adapterhub: warm-up request failed (%s): %s", status, text[:200])
        engine = Engine.from_scope({"app": app})
        if engine is not None:
            await engine.unload(WARMUP_ADAPTER)
    except Exception:
        logger.exception("adapterhub: warm-up failed; serving without it")
    finally:
        await _held()
        logger.info("adapterhub: warm-up done in %.1f s; ready", time.monotonic() - started)


async def _held() -> None:
    """Wait while the test hook `ADAPTERHUB_WARMUP_HOLD` names a file that does not exist yet."""
    hold = settings().warmup_hold
    if hold:
        logger.info("adapterhub: warm-up held until %s exists", hold)
        while not await asyncio.to_thread(Path(hold).exists):
            await asyncio.sleep(0.05)


async def _call(inner: App, app: Any, path: str, body: bytes) -> tuple[int, str]:
    """POST `body` to one of vLLM's own routes from inside the server; (status, response text)."""
    status, chunks, sent, done = 500, [], False, asyncio.Event()

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()  # the "client" goes away only once the answer is complete
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                done.set()

    try:
        await inner(scope_for(path, body, {"app": app}), receive, send)
    finally:
        done.set()
    return status, b"".join(chunks).decode(errors="replace")
