"""The JSONL dataset formats a recipe can train on, read and checked line by line.

One JSON object per line, in one of three formats (all lines of a file in the same one):

- ``prompt_completion``: ``{"prompt": "...", "completion": "..."}``
- ``chat``: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}``
  rendered with the tokenizer's chat template
- ``text``: ``{"text": "..."}`` raw text, for domain-adaptive continued training

Blank lines are skipped. Anything else is a `DatasetError` that names ``file:line``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from adapterhub_lite.errors import DatasetError

Format = Literal["prompt_completion", "chat", "text"]
FORMATS: tuple[Format, ...] = ("prompt_completion", "chat", "text")
ROLES = ("system", "user", "assistant")

# The keys that identify each format; extra keys (ids, metadata) are allowed and ignored.
_FORMAT_KEYS: dict[Format, tuple[str, ...]] = {
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "text": ("text",),
}


@dataclass(frozen=True)
class Example:
    """One validated line of a dataset file."""

    format: Format
    line: int
    prompt: str = ""
    completion: str = ""
    messages: tuple[dict[str, str], ...] = field(default_factory=tuple)
    text: str = ""


@dataclass(frozen=True)
class Dataset:
    """The examples of one JSONL file, with the file's digest (recorded in the training record)."""

    path: Path
    format: Format
    examples: list[Example]
    digest: str

    def __len__(self) -> int:
        return len(self.examples)


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of the file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def detect_format(obj: dict) -> Format | None:
    """The format whose keys an object carries, or None."""
    for fmt, keys in _FORMAT_KEYS.items():
        if all(k in obj for k in keys):
            return fmt
    return None


def _fail(where: str, what: str, hint: str | None = None) -> DatasetError:
    return DatasetError(f"{where}: {what}", hint=hint)


def _string(obj: dict, key: str, where: str, *, allow_empty: bool = False) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _fail(where, f"{key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _fail(where, f"{key!r} is empty")
    return value


def _parse_messages(obj: dict, where: str) -> tuple[dict[str, str], ...]:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise _fail(where, '\'messages\' must be a non-empty list of {"role", "content"} objects')
    out = []
    for i, m in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DatasetError(f"{at} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DatasetError(f"{at}: unknown role {m['role']!r}", hint=f"use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DatasetError(f"{at}: 'content' must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise _fail(where, "no 'assistant' message, so there is nothing to learn")
    return tuple(out)


def parse_line(raw: str, where: str, fmt: Format | None) -> Example | None:
    """Parse one line (``where`` is ``file:line``) into an Example of ``fmt`` (None: any format)."""
    if not raw.strip():
        return None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _fail(where, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise _fail(where, f"expected a JSON object, got {type(obj).__name__}")
    found = detect_format(obj)
    for fmt_, keys in _FORMAT_KEYS.items():
        if found is None and any(k in obj for k in keys):
            missing = " and ".join(repr(k) for k in keys if k not in obj)
            raise _fail(where, f"a {fmt_} record without {missing}")
    if found is None:
        keys = ", ".join(sorted(obj)) or "none"
        raise _fail(
            where,
            f"unknown record: keys {keys}",
            hint="each line needs 'prompt' and 'completion', or 'messages', or 'text'",
        )
    if fmt is not None and found != fmt:
        raise _fail(where, f"a {found} record in a {fmt} dataset", hint="use one format per file")
    line = int(where.rsplit(":", 1)[1])
    if found == "prompt_completion":
        return Example(
            "prompt_completion",
            line,
            prompt=_string(obj, "prompt", where, allow_empty=True),
            completion=_string(obj, "completion", where),
        )
    if found == "chat":
        return Example("chat", line, messages=_parse_messages(obj, where))
    return Example("text", line, text=_string(obj, "text", where))


def load_dataset(path: str | Path, format: Format | Literal["auto"] = "auto") -> Dataset:
    """Read and validate a JSONL dataset; the format is taken from the first record when ``auto``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    if format != "auto" and format not in FORMATS:
        raise DatasetError(
            f"unknown dataset format {format!r}", hint=f"use auto or one of {', '.join(FORMATS)}"
        )
    fmt: Format | None = None if format == "auto" else format
    examples: list[Example] = []
    with open(path, "rb") as f:
        for lineno, raw_bytes in enumerate(f, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: not UTF-8 text ({exc.reason})") from None
            ex = parse_line(raw, f"{path}:{lineno}", fmt)
            if ex is not None:
                fmt = ex.format
                examples.append(ex)
    if not examples:
        raise DatasetError(f"{path}: no examples (the file is empty)")
    assert fmt is not None
    return Dataset(path=path, format=fmt, examples=examples, digest=file_digest(path))
