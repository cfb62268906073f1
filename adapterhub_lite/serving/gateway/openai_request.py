"""The fields of an OpenAI completion/chat request the middleware reads or bounds, validated at the edge.

vLLM validates the rest of the request itself (and answers 400 for what it refuses). These fields are
checked here, before vLLM sees the request, because they are the ones a single request can hurt the
whole server with or that the middleware acts on:
- `n` and `best_of`: vLLM CVE-2026-34756, one request with a huge `n` crashed the server for every
  tenant; bounded to MAX_N.
- `max_tokens` / `max_completion_tokens`: bounded to MAX_TOKENS (vLLM then holds them to the context).
- `model` (the middleware resolves it) and `stream` (the middleware meters streams): a JSON `"true"`
  is not `true`; vLLM's lax parsing would stream it while the middleware counted it as a non-stream.
Types are strict, so `"n": "5"` is a clear 400 rather than a guess.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

MAX_N = 16  # choices per request (OpenAI's own cap is 128; one CPU server shares its batch with everyone)
MAX_TOKENS = 1 << 20  # tokens to generate; far above any served context, far below an overflow
MAX_JSON_DEPTH = 64  # nesting of the request JSON (chat content parts and tool schemas stay well below)


class InferenceRequest(BaseModel):
    """The bounded fields; every other field passes through to vLLM untouched."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr = Field(min_length=1, max_length=512)
    n: StrictInt | None = Field(default=None, ge=1, le=MAX_N)
    best_of: StrictInt | None = Field(default=None, ge=1, le=MAX_N)
    max_tokens: StrictInt | None = Field(default=None, ge=0, le=MAX_TOKENS)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=0, le=MAX_TOKENS)
    stream: StrictBool | None = None


def depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of parsed JSON, counted without recursion and given up past `limit`."""
    if not isinstance(value, dict | list):
        return 0
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        children = item.values() if isinstance(item, dict) else item
        stack.extend((v, level + 1) for v in children if isinstance(v, dict | list))  # containers only
    return deepest


class RequestRefused(ValueError):
    """The request body is not an acceptable request; `str()` is the one-line answer for the client."""


def parse_request(body: bytes) -> tuple[dict[str, Any], InferenceRequest]:
    """The JSON object of `body` and its validated fields, or RequestRefused saying what is wrong."""
    try:
        payload = json.loads(body)
    except RecursionError:
        raise RequestRefused(f"the JSON is nested over {MAX_JSON_DEPTH} levels deep") from None
    except ValueError:  # includes a body that is not UTF-8
        raise RequestRefused("the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise RequestRefused("the body must be a JSON object with a string `model`")
    if depth(payload) > MAX_JSON_DEPTH:
        raise RequestRefused(f"the JSON is nested over {MAX_JSON_DEPTH} levels deep")
    try:
        fields = InferenceRequest.model_validate(payload)
    except ValidationError as exc:
        raise RequestRefused(_first_problem(exc)) from None
    return payload, fields


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in error["loc"]) or "body"
    if where == "model" and error["type"] == "missing":
        return "the body must be a JSON object with a string `model`"
    return f"`{where}`: {error['msg']}"
