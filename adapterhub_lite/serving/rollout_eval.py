"""The evaluation gate: a held-out set run through the live server against both versions of an alias.

The set is prompt/completion JSONL (the project's training format: `{"prompt": ..., "completion": ...}`
per line). Each prompt is sent to the running server as a completion request for each immutable
reference (greedy, with the admin key, which may name any registry adapter), and the answer's first
line is compared with the expected completion's first line (exact match, after trimming spaces). The
candidate passes when its exact match is at least the current version's minus `margin`.

Running through the live server (not an offline copy of the model) means the gate measures what
tenants would get: the same vLLM, the same kernels, the same bundle verification.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from adapterhub_lite.errors import ErrorKind, ServingError

MAX_EXAMPLES = 500
MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_NEW_TOKENS = 32
CONCURRENCY = 4
TIMEOUT_S = 120.0


class Example(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    completion: str


def load_examples(path: str | Path, limit: int = MAX_EXAMPLES) -> list[Example]:
    """The held-out set from a JSONL file; ServingError (INVALID) naming the first bad line."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_FILE_BYTES:
            raise ServingError(
                f"evaluation file {p} is over {MAX_FILE_BYTES // (1024 * 1024)} MiB",
                hint=f"use a held-out set of at most {MAX_EXAMPLES} examples",
                kind=ErrorKind.INVALID,
            )
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ServingError(
            f"cannot read evaluation file {p}: {getattr(e, 'strerror', None) or e}",
            hint="give a prompt/completion JSONL file with --eval-file",
            kind=ErrorKind.INVALID,
        ) from None
    return parse_examples(lines, str(p), limit)


def parse_examples(
    lines: list[str], where: str = "the evaluation set", limit: int = MAX_EXAMPLES
) -> list[Example]:
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(Example.model_validate(json.loads(line)))
        except (ValueError, ValidationError):
            raise ServingError(
                f"{where} line {n}: not a JSON object with string `prompt` and `completion`",
                hint='one {"prompt": ..., "completion": ...} object per line',
                kind=ErrorKind.INVALID,
            ) from None
        if len(out) >= limit:
            break
    if not out:
        raise ServingError(f"{where} holds no examples", kind=ErrorKind.INVALID)
    return out


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


async def exact_match(client: httpx.AsyncClient, ref: str, examples: list[Example]) -> float:
    """The fraction of `examples` that `ref` answers exactly, through the server behind `client`."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(ex: Example) -> bool:
        want = _first_line(ex.completion)
        body = {
            "model": ref,
            "prompt": ex.prompt,
            "max_tokens": MAX_NEW_TOKENS,
            "temperature": 0,
        }
        async with gate:
            r = await client.post("/v1/completions", json=body)
        if r.status_code != 200:
            raise ServingError(
                f"the server answered {r.status_code} for {ref} during the evaluation gate",
                hint="check that the server runs and can load both versions (see its log)",
                kind=ErrorKind.UNAVAILABLE,
            )
        text = r.json()["choices"][0].get("text") or ""
        return _first_line(text) == want

    hits = await asyncio.gather(*(one(ex) for ex in examples))
    return sum(hits) / len(examples)


async def evaluate(
    url: str, admin_key: str, current: str, candidate: str, examples: list[Example], margin: float
) -> tuple[bool, dict[str, Any]]:
    """Run the gate; (passed, result) where result is what the rollout records."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    try:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=TIMEOUT_S) as client:
            cur = await exact_match(client, current, examples)
            cand = await exact_match(client, candidate, examples)
    except httpx.HTTPError as e:
        raise ServingError(
            f"cannot run the evaluation gate against {url}: {type(e).__name__}",
            hint="check --server and that the server is up",
            kind=ErrorKind.UNAVAILABLE,
        ) from None
    passed = cand >= cur - margin - 1e-9
    verdict = "passed" if passed else "refused"
    result = {
        "metric": "exact_match",
        "examples": len(examples),
        "current": cur,
        "candidate": cand,
        "margin": margin,
        "passed": passed,
        "reason": f"evaluation gate {verdict}: exact match {cand:.3f} (candidate) vs {cur:.3f} (current), "
        f"margin {margin:g}",
    }
    return passed, result
