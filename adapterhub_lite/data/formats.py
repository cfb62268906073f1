"""The record formats a recipe can train on, checked record by record.

Every record of a dataset is in one format, named in the recipe or detected from the first record:

- ``prompt_completion``: ``{"prompt": "...", "completion": "..."}`` (TRL)
- ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` (OpenAI),
  rendered with the tokenizer's chat template
- ``alpaca``: ``{"instruction": "...", "input": "...", "output": "..."}`` (``input``, ``system`` optional),
  trained as a chat: the user says the instruction (and the input), the assistant the output
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}``, trained as
  a chat (``user``/``assistant`` and a top-level ``system`` are accepted too, as LLaMA-Factory writes them)
- ``text``: ``{"text": "..."}`` raw text, for domain-adaptive continued training

Files are read by `readers.read_rows` (JSON Lines, JSON arrays, CSV, Parquet, save_to_disk folders).
A bad record is a `DatasetError` that names ``file:line``, or, with ``skip_bad_lines``, is skipped and
reported in `Dataset.skipped`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from adapterhub_lite.data.readers import read_rows
from adapterhub_lite.errors import DatasetError

Format = Literal["prompt_completion", "chat", "alpaca", "sharegpt", "text"]
FORMATS: tuple[Format, ...] = ("prompt_completion", "chat", "alpaca", "sharegpt", "text")
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
MAX_REPORTED = 20  # skipped or over-long lines named in a record; the rest are counted

# The keys that identify each format; extra keys (ids, metadata) are allowed and ignored.
_FORMAT_KEYS: dict[Format, tuple[str, ...]] = {
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
    "text": ("text",),
}
FORMATS_HINT = (
    "each record needs 'prompt' and 'completion' (prompt_completion), 'messages' (chat, OpenAI), "
    "'instruction' and 'output' (alpaca), 'conversations' (sharegpt), or 'text' (text)"
)


@dataclass(frozen=True)
class Example:
    """One validated record; ``format`` is how it is trained (alpaca and sharegpt become ``chat``)."""

    format: Literal["prompt_completion", "chat", "text"]
    line: int
    prompt: str = ""
    completion: str = ""
    messages: tuple[dict[str, str], ...] = field(default_factory=tuple)
    text: str = ""


@dataclass(frozen=True)
class Dataset:
    """The examples of one file or folder, its format, digest, and the records skipped (where: what)."""

    path: Path
    format: Format
    examples: list[Example]
    digest: str
    skipped: list[str] = field(default_factory=list)
    n_skipped: int = 0

    def __len__(self) -> int:
        return len(self.examples)


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of the file's bytes (of every file, by relative name, for a folder)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def _present(obj: dict) -> dict:
    # Files read as a table give every record every column; a missing key reads as None.
    return {k: v for k, v in obj.items() if v is not None}


def detect_format(obj: dict) -> Format | None:
    """The format whose keys an object carries, or None."""
    obj = _present(obj)
    for fmt, keys in _FORMAT_KEYS.items():
        if all(k in obj for k in keys):
            return fmt
    return None


def _fail(where: str, what: str, hint: str | None = None) -> DatasetError:
    return DatasetError(f"{where}: {what}", hint=hint)


def _string(obj: dict, key: str, where: str, *, allow_empty: bool = False) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise _fail(where, f"{key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _fail(
            where, f"{key!r} is empty", hint="give it text, or pass skip_bad_lines: true to skip such records"
        )
    return value


def _check_messages(messages: list[dict[str, str]], where: str) -> tuple[dict[str, str], ...]:
    if not any(m["role"] == "assistant" for m in messages):
        raise _fail(where, "no 'assistant' message, so there is nothing to learn")
    return tuple(messages)


def _parse_messages(obj: dict, where: str) -> tuple[dict[str, str], ...]:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise _fail(where, '\'messages\' must be a non-empty list of {"role", "content"} objects')
    out = []
    for i, m in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict) or m.get("role") is None or m.get("content") is None:
            raise DatasetError(f"{at} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DatasetError(f"{at}: unknown role {m['role']!r}", hint=f"use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DatasetError(f"{at}: 'content' must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return _check_messages(out, where)


def _parse_alpaca(obj: dict, where: str) -> tuple[dict[str, str], ...]:
    instruction = _string(obj, "instruction", where)
    extra = _string(obj, "input", where, allow_empty=True)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _string(obj, "output", where)},
    ]
    if _string(obj, "system", where, allow_empty=True).strip():
        messages.insert(0, {"role": "system", "content": obj["system"]})
    return tuple(messages)


def _parse_sharegpt(obj: dict, where: str) -> tuple[dict[str, str], ...]:
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        raise _fail(where, '\'conversations\' must be a non-empty list of {"from", "value"} objects')
    out = []
    if _string(obj, "system", where, allow_empty=True).strip():
        out.append({"role": "system", "content": obj["system"]})
    for i, t in enumerate(turns):
        at = f"{where}: conversations[{i}]"
        if not isinstance(t, dict) or t.get("from") is None or t.get("value") is None:
            raise DatasetError(f"{at} must be an object with 'from' and 'value'")
        role = _SHAREGPT_ROLES.get(t["from"]) if isinstance(t["from"], str) else None
        if role is None:
            raise DatasetError(
                f"{at}: unknown speaker {t['from']!r}", hint=f"use one of {', '.join(_SHAREGPT_ROLES)}"
            )
        if not isinstance(t["value"], str):
            raise DatasetError(f"{at}: 'value' must be a string, got {type(t['value']).__name__}")
        out.append({"role": role, "content": t["value"]})
    return _check_messages(out, where)


def parse_record(obj: object, where: str, line: int, fmt: Format | None) -> Example:
    """Check one record (``where`` is ``file:line``) and turn it into an Example (``fmt`` None: any)."""
    if not isinstance(obj, dict):
        raise _fail(where, f"expected a JSON object, got {type(obj).__name__}", hint=FORMATS_HINT)
    obj = _present(obj)
    found = detect_format(obj)
    for fmt_, keys in _FORMAT_KEYS.items():
        if found is None and any(k in obj for k in keys):
            missing = " and ".join(repr(k) for k in keys if k not in obj)
            raise _fail(where, f"a {fmt_} record without {missing}", hint=FORMATS_HINT)
    if found is None:
        keys = ", ".join(sorted(obj)) or "none"
        raise _fail(where, f"unknown record: keys {keys}", hint=FORMATS_HINT)
    if fmt is not None and found != fmt:
        raise _fail(where, f"a {found} record in a {fmt} dataset", hint="use one format per file")
    if found == "prompt_completion":
        return Example(
            "prompt_completion",
            line,
            prompt=_string(obj, "prompt", where, allow_empty=True),
            completion=_string(obj, "completion", where),
        )
    if found == "chat":
        return Example("chat", line, messages=_parse_messages(obj, where))
    if found == "alpaca":
        return Example("chat", line, messages=_parse_alpaca(obj, where))
    if found == "sharegpt":
        return Example("chat", line, messages=_parse_sharegpt(obj, where))
    return Example("text", line, text=_string(obj, "text", where))


def load_dataset(
    path: str | Path, format: Format | Literal["auto"] = "auto", *, skip_bad_lines: bool = False
) -> Dataset:
    """Read and check a dataset; the format is the first good record's when ``auto``.

    ``skip_bad_lines``: records that cannot be read or checked are skipped and reported in
    ``Dataset.skipped`` (the first `MAX_REPORTED`, ``where: what``) instead of failing the whole file.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset file not found: {path}")
    if format != "auto" and format not in FORMATS:
        raise DatasetError(
            f"unknown dataset format {format!r}", hint=f"use auto or one of {', '.join(FORMATS)}"
        )
    rows, unreadable = read_rows(path)
    if unreadable and not skip_bad_lines:
        first = unreadable[0]
        raise DatasetError(
            f"{first.where}: {first.what}",
            hint="fix the line, or pass skip_bad_lines: true in the recipe to skip bad lines",
        )
    skipped = [(b.line, f"{b.where}: {b.what}") for b in unreadable]
    fmt: Format | None = None if format == "auto" else format
    examples: list[Example] = []
    for row in rows:
        try:
            ex = parse_record(row.data, row.where, row.line, fmt)
        except DatasetError as exc:
            if not skip_bad_lines:
                raise
            skipped.append((row.line, str(exc)))
            continue
        if fmt is None:
            fmt = detect_format(row.data)  # type: ignore[arg-type]
        examples.append(ex)
    if not examples:
        what = (
            "no examples (the file is empty)" if not skipped else f"no good examples ({len(skipped)} skipped)"
        )
        raise DatasetError(f"{path}: {what}", hint=FORMATS_HINT)
    assert fmt is not None
    skipped.sort()
    return Dataset(
        path=path,
        format=fmt,
        examples=examples,
        digest=file_digest(path),
        skipped=[s for _, s in skipped[:MAX_REPORTED]],
        n_skipped=len(skipped),
    )
