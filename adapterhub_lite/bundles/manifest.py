"""The bundle manifest (`manifest.json`): schema version 1, validated with pydantic.

The bundle's identity is `Manifest.digest`, a sha256 over the canonical JSON of the manifest. The file
on disk must be exactly `Manifest.to_json()`, so that no byte of it can change without being noticed.
Size and nesting are bounded before parsing: a hostile manifest cannot exhaust memory or the stack.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adapterhub_lite.bundles.naming import check_name, check_tag, check_version
from adapterhub_lite.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
# The files a version-1 bundle holds besides manifest.json and the optional signatures.json.
BUNDLE_FILES = ("README.md", "adapter_config.json", "adapter_model.safetensors")
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 32
_HEX64 = r"^[0-9a-f]{64}$"
_FILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_REPACK = "pack the adapter again with `adapterhub pack`; never edit a bundle by hand"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class FileEntry(_Strict):
    path: str = Field(pattern=_FILE_NAME)
    size: int = Field(ge=0, le=1 << 40)
    sha256: str = Field(pattern=_HEX64)


class BaseRef(_Strict):
    name: str = Field(min_length=1, max_length=200)
    fingerprint: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")


class AdapterInfo(_Strict):
    peft_type: Literal["LORA"]
    rank: int = Field(ge=1, le=1 << 16)
    alpha: float = Field(gt=0)
    use_rslora: bool
    target_modules: list[str] = Field(max_length=256)
    layers: list[int] = Field(max_length=4096)
    modules: int = Field(ge=1)
    parameter_count: int = Field(ge=1)
    dtypes: list[str] = Field(min_length=1, max_length=8)


class Manifest(_Strict):
    """What a bundle is: who, which version, for which base, what shape, which files, how trained."""

    schema_version: Literal[1] = SCHEMA_VERSION
    format: Literal["adapterhub-bundle"] = "adapterhub-bundle"
    namespace: str
    name: str
    version: str
    description: str = Field(default="", max_length=2000)
    tags: list[str] = Field(default_factory=list, max_length=32)
    license: str = Field(min_length=1, max_length=100)
    base: BaseRef
    adapter: AdapterInfo
    files: list[FileEntry] = Field(min_length=1, max_length=len(BUNDLE_FILES))
    training: dict[str, Any] | None = None
    tool_version: str = Field(max_length=50)
    created: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        return check_name(v, "namespace", ValueError)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "name", ValueError)

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        return check_version(v, ValueError)

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        for t in v:
            check_tag(t, ValueError)
        return v

    @model_validator(mode="after")
    def _files(self) -> Manifest:
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("files lists a path twice")
        if paths != sorted(paths):
            raise ValueError("files must be sorted by path")
        if set(paths) != set(BUNDLE_FILES):
            raise ValueError(f"files must list exactly {', '.join(BUNDLE_FILES)} (schema version 1)")
        return self

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}@{self.version}"

    def canonical_bytes(self) -> bytes:
        """The bytes the digest is taken over: sorted keys, no whitespace, UTF-8."""
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()

    @property
    def digest(self) -> str:
        """The bundle's identity: `sha256:<hex>` over the canonical manifest."""
        return "sha256:" + hashlib.sha256(self.canonical_bytes()).hexdigest()

    def to_json(self) -> bytes:
        """The exact bytes of `manifest.json` (sorted keys, indented, trailing newline)."""
        return (
            json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=2, ensure_ascii=False) + "\n"
        ).encode()

    def file(self, path: str) -> FileEntry:
        return next(f for f in self.files if f.path == path)


def json_depth(data: bytes) -> int:
    """Deepest nesting of arrays/objects in JSON text, found without parsing it (no recursion)."""
    depth = deepest = 0
    in_string = escape = False
    for byte in data:
        if in_string:
            if escape:
                escape = False
            elif byte == 0x5C:  # backslash
                escape = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


class _Refused(ValueError):
    pass


def _no_constants(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Refused(f"key {dup[:60]!r} appears twice in one object")
    return out


def load_json_bounded(
    data: bytes,
    label: str,
    max_bytes: int = MAX_MANIFEST_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    hint: str = _REPACK,
) -> Any:
    """Parse JSON after checking its size and nesting depth; errors name `label` and fit on one line.

    Also refused: NaN/Infinity (not JSON, but Python's parser takes them) and a key repeated in one
    object (parsers disagree on which copy wins, so two readers could see two different files).
    """
    if len(data) > max_bytes:
        raise BundleError(f"{label}: {len(data)} bytes is over the {max_bytes}-byte limit", hint=hint)
    depth = json_depth(data)
    if depth > max_depth:
        raise BundleError(
            f"{label}: JSON nested {depth} levels deep, over the limit of {max_depth}", hint=hint
        )
    try:
        return json.loads(data, parse_constant=_no_constants, object_pairs_hook=_no_duplicates)
    except _Refused as exc:
        raise BundleError(f"{label}: {exc}", hint=hint) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise BundleError(f"{label}: not valid JSON ({reason})", hint=hint) from None


def parse_manifest(data: bytes, label: str = MANIFEST_FILE, *, require_canonical: bool = True) -> Manifest:
    """Validate manifest bytes; with `require_canonical`, refuse any byte that `to_json` would not write."""
    raw = load_json_bounded(data, label)
    if not isinstance(raw, dict):
        raise BundleError(f"{label}: not a JSON object", hint=_REPACK)
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(
            f"{label}: schema_version {raw.get('schema_version')!r} is not supported (this tool reads "
            f"version {SCHEMA_VERSION})",
            hint="upgrade adapterhub-lite, or pack the adapter again with this version",
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise BundleError(f"{label}: invalid manifest: {problems}", hint=_REPACK) from None
    if require_canonical and manifest.to_json() != data:
        raise BundleError(f"{label}: not in canonical form (edited after packing, or corrupt)", hint=_REPACK)
    return manifest
