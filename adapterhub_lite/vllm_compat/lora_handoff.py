"""When vLLM has finished reading an adapter folder a resolver handed it (vLLM 0.32).

vLLM's API server (`OpenAIServingModels.resolve_lora`) asks the resolvers for a `LoRARequest`, then
awaits `engine_client.add_lora`, which returns once the worker has read the folder (loaded) or failed
to. `report_lora_reads(callback)` wraps that method so that `callback(lora_name)` runs when it
returns, either way. A cancelled request is not reported: the engine may still be reading, so the
resolver's lease runs out by itself instead.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("adapterhub.serving")
SERVING_MODELS_MODULE = "vllm.entrypoints.openai.models.serving"


def report_lora_reads(callback: Callable[[str], None]) -> bool:
    """Call `callback(lora_name)` after each resolver-driven load in vLLM's API server ends.

    Returns whether the hook is in place (idempotent). Only in vLLM's API server, which has imported
    the module by the time it loads plugins (the engine and workers never resolve adapters, and
    importing the API's modules there would only cost memory). If vLLM's shape changed it logs and
    leaves vLLM alone: leases then end by their time limit.
    """
    module = sys.modules.get(SERVING_MODELS_MODULE)
    if module is None:
        return False
    cls = getattr(module, "OpenAIServingModels", None)
    method = getattr(cls, "resolve_lora", None)
    if method is None or not asyncio.iscoroutinefunction(method):
        logger.warning("adapterhub: vLLM's resolve_lora changed shape; adapter leases end by time")
        return False
    if getattr(method, "_adapterhub", False):
        return True

    async def resolve_lora(self: Any, lora_name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            result = await method(self, lora_name, *args, **kwargs)
        except asyncio.CancelledError:
            raise  # the engine may still be reading the folder
        except BaseException:
            _report(callback, lora_name)
            raise
        _report(callback, lora_name)
        return result

    resolve_lora._adapterhub = True  # type: ignore[attr-defined]
    resolve_lora.__wrapped__ = method  # type: ignore[attr-defined]
    cls.resolve_lora = resolve_lora
    return True


def _report(callback: Callable[[str], None], lora_name: str) -> None:
    try:
        callback(lora_name)
    except Exception:  # a failing report must not fail the request; the lease's time ends it
        logger.exception("adapterhub: reporting the end of the load of %s failed", lora_name)
