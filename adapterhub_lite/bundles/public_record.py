"""What of a training record goes into a published bundle: results, not the publisher's machine.

`adapterhub train` records where things were on the machine that trained (the base directory, the data
file, the output folder). None of that means anything to the bundle's users, and it tells them user
names and folder layouts. A bundle records data by file name and sha256, the base by name and
fingerprint, and no local path at all. Bundles packed before this keep what they recorded and still
verify: the manifest's `training` field is free-form.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

# Recipe fields that only say where things were on the training machine.
_LOCAL_ONLY = frozenset({"output_dir", "resume_from", "checkpoint_dir", "cache_dir", "logging_dir"})
_DATA_FIELDS = ("data", "eval_data")
# An absolute POSIX path, a home-relative one, or a Windows drive path inside any string. Every
# repetition ends at a separator its class excludes, so the match is linear in the string's length.
_PATH_IN_TEXT = re.compile(r"(?<![\w.])(?:~|[A-Za-z]:)?[/\\](?:[^\s/\\'\"]+[/\\])+(?P<name>[^\s/\\'\"]+)")


def _is_local_path(value: str) -> bool:
    return (
        value.startswith(("/", "~", "\\\\"))
        or PureWindowsPath(value).drive != ""
        or ("/" in value and Path(value).expanduser().exists())
    )


def _file_name(value: str) -> str:
    return PureWindowsPath(value).name if "\\" in value else PurePosixPath(value).name


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        if _is_local_path(value):
            return _file_name(value)
        return _PATH_IN_TEXT.sub(lambda m: m.group("name"), value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if k not in _LOCAL_ONLY}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _digest(path: str | None) -> str | None:
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        return None
    from adapterhub_lite.data import file_digest

    return file_digest(p)


def public_record(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The training record as a bundle carries it: data as `{"file", "sha256"}`, no local paths."""
    if record is None:
        return None
    out = dict(record)
    dataset = out.get("dataset") if isinstance(out.get("dataset"), dict) else None
    recipe = out.get("recipe") if isinstance(out.get("recipe"), dict) else None
    if recipe is not None:
        recipe = dict(recipe)
        for key in _DATA_FIELDS:
            value = recipe.get(key)
            if isinstance(value, str) and value:
                known = dataset.get("digest") if key == "data" and dataset else None
                recipe[key] = {"file": _file_name(value), "sha256": known or _digest(value)}
        base = recipe.get("base")
        if isinstance(base, str) and base != "embedded" and _is_local_path(base):
            recipe["base"] = _file_name(base)
        out["recipe"] = recipe
    if dataset is not None:
        dataset = dict(dataset)
        if isinstance(dataset.get("path"), str):
            dataset["file"] = _file_name(dataset.pop("path"))
        out["dataset"] = dataset
    if isinstance(out.get("base"), dict):
        out["base"] = {k: v for k, v in out["base"].items() if k != "path"}
    return _scrub(out)


def public_config(config_bytes: bytes, config: dict[str, Any], base_name: str) -> bytes:
    """adapter_config.json with `base_model_name_or_path` naming the base, not a local path or "None"."""
    import json

    value = config.get("base_model_name_or_path")
    if isinstance(value, str) and value not in ("", "None") and not _is_local_path(value):
        return config_bytes
    fixed = {**config, "base_model_name_or_path": base_name}
    return (json.dumps(fixed, indent=2, sort_keys=True) + "\n").encode()
