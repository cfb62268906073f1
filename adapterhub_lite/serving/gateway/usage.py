"""Token usage of a proxied OpenAI response, read as it streams by, for metrics and token rate limits.

A non-streaming response carries `usage` in its JSON. A stream carries it only in a last usage-only
event, which vLLM sends when the request asks for `stream_options.include_usage`; the middleware asks
for it on every stream and hides that event from clients that did not ask, so counts are exact.
"""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from typing import Any


class UsageMeter:
    """Reads status and token usage from a response as it streams by, without changing it."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.streaming = False
        self._buf = bytearray()
        self._prompt = 0
        self._completion = 0
        self._chunks = 0
        self._saw_usage = False

    def observe(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            for k, v in message.get("headers", []):
                if k.lower() == b"content-type" and b"text/event-stream" in v:
                    self.streaming = True
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            if not self.streaming:
                self._buf.extend(body)
                return
            # Runs for every streamed token on the server's event loop, so it only counts events;
            # the one with usage (vLLM sends each event in one message) is parsed.
            events = body.count(b"data: ")
            if b'"usage":{' in body:
                for event in body.split(b"\n\n"):
                    if b'"usage":{' in event and event.startswith(b"data: "):
                        try:
                            self._take_usage(json.loads(event[6:])["usage"])
                            events -= 1
                        except (ValueError, KeyError, TypeError):
                            pass
            self._chunks += events - body.count(b"data: [DONE]")

    def _take_usage(self, usage: dict) -> None:
        self._saw_usage = True
        self._prompt = int(usage.get("prompt_tokens") or 0)
        self._completion = int(usage.get("completion_tokens") or 0)

    def tokens(self) -> tuple[int, int]:
        """(prompt, completion) tokens; for a stream without usage, one token per content chunk."""
        if not self.streaming and self._buf:
            try:
                usage = json.loads(bytes(self._buf)).get("usage")
                if usage:
                    self._take_usage(usage)
            except (ValueError, AttributeError):
                pass
        if self._saw_usage:
            return self._prompt, self._completion
        return 0, self._chunks


def ask_for_stream_usage(payload: dict) -> bool:
    """Make a stream end with vLLM's usage event, so that metrics and token limits count exactly.

    Returns True when the client did not ask for it: the middleware then removes that event again.
    A client asking for continuous usage stats without `include_usage` is left alone (counted per chunk).
    """
    if payload.get("stream") is not True:
        return False
    options = payload.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict) or options.get("include_usage") or options.get("continuous_usage_stats"):
        return False
    payload["stream_options"] = {**options, "include_usage": True}
    return True


def without_usage_event(body: bytes) -> bytes:
    """`body` without the usage-only event (`"choices":[]` and a usage object) that ends a stream."""
    if b'"usage":{' not in body:
        return body
    events = body.split(b"\n\n")
    kept = [e for e in events if not (e.startswith(b"data: ") and b'"usage":{' in e and b'"choices":[]' in e)]
    return b"\n\n".join(kept)
