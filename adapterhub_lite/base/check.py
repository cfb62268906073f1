"""Checking a base model directory before any work starts: config, weights and a usable tokenizer.

A directory that transformers would half-load (an empty tokenizer, no weights, a tokenizer whose ids
run past the model's embeddings) is refused here with one line naming what is missing, so training,
packing and serving never start on it. The check reads file headers and the tokenizer file only (no
torch, no transformers), and its verdict is cached per directory state.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from adapterhub_lite.errors import BaseModelError

_HINT = (
    "save the model with `model.save_pretrained(dir)` and its tokenizer with `tokenizer.save_pretrained(dir)`"
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class BaseInfo:
    """What the check read: the config, the weight files and the tokenizer's size."""

    config: dict
    weight_files: tuple[Path, ...]
    tokenizer_file: Path
    tokenizer_size: int | None  # None where only a sentencepiece/vocab file is there (not read)


def vocab_size(config: dict) -> int | None:
    """The model's embedding rows (``vocab_size``, or its text config's for multimodal configs)."""
    for cfg in (config, config.get("text_config") or {}):
        if isinstance(cfg, dict) and isinstance(cfg.get("vocab_size"), int):
            return cfg["vocab_size"]
    return None


def _read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise BaseModelError(
            f"{path} has no config.json, so it is not a Hugging Face model directory", hint=_HINT
        )
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BaseModelError(f"{file}: not valid JSON ({exc})", hint=_HINT) from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise BaseModelError(
            f"{file}: no 'model_type', so transformers cannot tell the architecture", hint=_HINT
        )
    return config


def _weight_files(path: Path) -> tuple[Path, ...]:
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (path / single).is_file():
            return (path / single,)
        index = path / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise BaseModelError(f"{index}: not a valid weight index", hint=_HINT) from None
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise BaseModelError(
                    f"{path} lacks weight shard(s) {', '.join(missing[:3])} named by {index.name}"
                )
            return tuple(path / s for s in shards)
    loose = tuple(sorted(path.glob("*.safetensors")))  # shards without an index: the fingerprint reads them
    if loose:
        return loose
    raise BaseModelError(f"{path} has no weights (model.safetensors or pytorch_model.bin)", hint=_HINT)


def _tokenizer(path: Path, rows: int | None) -> tuple[Path, int | None]:
    file = next((path / f for f in _TOKENIZER_FILES if (path / f).is_file()), None)
    if file is None:
        raise BaseModelError(
            f"{path} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)",
            hint="copy the tokenizer the model was trained with into the directory "
            "(`tokenizer.save_pretrained(dir)`)",
        )
    if file.name != "tokenizer.json":
        return file, None
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust side raises a bare Exception
        raise BaseModelError(f"{file}: not a usable tokenizer ({str(exc)[:200]})", hint=_HINT) from None
    vocab = tok.get_vocab(with_added_tokens=True)
    if not vocab:
        raise BaseModelError(f"{file}: the tokenizer has no tokens", hint=_HINT)
    top = max(vocab.values())
    if rows is not None and top >= rows:
        raise BaseModelError(
            f"{path}: the tokenizer has ids up to {top} but the model has {rows} embedding rows "
            "(vocab_size in config.json)",
            hint="use the tokenizer the model was built with, or resize its embeddings and save it again",
        )
    return file, len(vocab)


@functools.lru_cache(maxsize=32)
def _check(path: Path, _state: tuple) -> BaseInfo:
    config = _read_config(path)
    weights = _weight_files(path)
    tokenizer_file, size = _tokenizer(path, vocab_size(config))
    return BaseInfo(config, weights, tokenizer_file, size)


def check_base(path: str | Path) -> BaseInfo:
    """Refuse a model directory without a config, weights or a usable tokenizer (one line each)."""
    path = Path(path)
    state = tuple(
        (p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(path.iterdir()) if p.is_file()
    )
    return _check(path, state)
