"""The hub's HTTP API as data: each route's method and path, and the JSON it takes and gives, written once.

The hub (`adapterhub_lite.hub.api`) declares its routes from these and validates every request against
them at the edge; the client (`registry.remote`) builds its requests from the same routes and validates
every answer against the same models, so a hub (or anything on a plain-http path) cannot hand the CLI a
row with a name that is not a name. Request models are strict: a JSON `"false"` is not a boolean.
"""

from __future__ import annotations

from typing import Annotated, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    model_validator,
)

from adapterhub_lite.bundles.naming import check_name, check_tag, check_version, parse_ref

API = "/api/v1"
MAX_RESULTS = 500
MAX_QUERY_CHARS = 200
MAX_BODY = 64 * 1024  # a JSON request body (publish streams its archive under its own limit)


class Route(NamedTuple):
    method: str
    path: str


HEALTH = Route("GET", "/health")
OPENAPI = Route("GET", f"{API}/openapi.json")
WHOAMI = Route("GET", f"{API}/whoami")
PUBLISH = Route("PUT", f"{API}/publish")
RESOLVE = Route("GET", f"{API}/resolve")
FILES = Route("GET", f"{API}/files")
FILE = Route("GET", f"{API}/file/{{namespace}}/{{name}}/{{version}}/{{file}}")
MANIFEST = Route("GET", f"{API}/manifest")
SEARCH = Route("GET", f"{API}/search")
VERSIONS = Route("GET", f"{API}/versions")
NAMESPACES = Route("GET", f"{API}/namespaces")
YANK = Route("POST", f"{API}/yank")
SHARE = Route("POST", f"{API}/share")
SHARED_WITH = Route("GET", f"{API}/shared-with")
READABLE = Route("GET", f"{API}/readable")
CAN_READ = Route("GET", f"{API}/can-read")
# Requests that carry a body, and who may send one at all (checked before a byte of it is read).
BODY_ROUTES = {PUBLISH.path, YANK.path, SHARE.path}


def file_path(namespace: str, name: str, version: str, file: str) -> str:
    return FILE.path.format(namespace=namespace, name=name, version=version, file=file)


def _plain(value: str) -> str:
    # Whole-string rules, whatever the name patterns' anchors: no trailing newline, nothing invisible.
    if not value.isascii() or not value.isprintable() or value != value.strip():
        raise ValueError(f"{value[:80]!r} holds spaces or characters that are not printable ASCII")
    return value


def _name(value: str) -> str:
    return check_name(_plain(value), "name", ValueError)


def _namespace(value: str) -> str:
    return check_name(_plain(value), "namespace", ValueError)


def _version(value: str) -> str:
    return check_version(_plain(value), ValueError)


def _ref(value: str) -> str:
    parse_ref(_plain(value), ValueError)
    return value


def _tag(value: str) -> str:
    return check_tag(_plain(value), ValueError)


def _text(value: str) -> str:
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        raise ValueError("holds control characters")
    return value


# Length rules as StringConstraints (not Field), so FastAPI keeps them on query and path parameters.
# pydantic's patterns are Rust regexes, where `$` is the end of the text (no newline before it).
# The patterns (loose: the validators hold the exact rules) put the shapes into the OpenAPI document, so
# a generated request can be a well-formed one.
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_VERSION = r"[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]{1,50})?"
Namespace = Annotated[str, StringConstraints(max_length=64, pattern=f"^{_NAME}$"), AfterValidator(_namespace)]
Name = Annotated[str, StringConstraints(max_length=64, pattern=f"^{_NAME}$"), AfterValidator(_name)]
Version = Annotated[str, StringConstraints(max_length=64, pattern=f"^{_VERSION}$"), AfterValidator(_version)]
Ref = Annotated[
    str,
    StringConstraints(max_length=200, pattern=f"^{_NAME}/{_NAME}(@{_VERSION})?$"),
    AfterValidator(_ref),
]
Tag = Annotated[str, StringConstraints(max_length=32), AfterValidator(_tag)]
Digest = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
QueryText = Annotated[str, StringConstraints(max_length=MAX_QUERY_CHARS), AfterValidator(_text)]
Word = Annotated[str, StringConstraints(max_length=200), AfterValidator(_plain)]  # a fingerprint, a time
Scope = Literal["read", "publish", "admin"]
ErrorKindName = Literal[
    "invalid", "not_found", "conflict", "unauthenticated", "forbidden", "limited", "unavailable", "internal"
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Answer(BaseModel):
    # Answers may grow fields: a client ignores ones it does not know, and checks the ones it does.
    model_config = ConfigDict(extra="ignore")


# ----------------------------------------------------------------------------------------- requests
class YankRequest(_Request):
    ref: Ref
    reason: Annotated[str, Field(max_length=1000)] = ""
    undo: StrictBool = False


class ShareRequest(_Request):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    ref: Ref
    public: StrictBool | None = None
    with_: Namespace | None = Field(default=None, alias="with")
    revoke: StrictBool = False


# ----------------------------------------------------------------------------------------- answers
class Health(_Answer):
    status: Literal["ok"]


class Whoami(_Answer):
    namespace: Namespace | None
    scope: Scope | None


class VersionRow(_Answer):
    """One published version (`registry.records.Published.to_dict()`)."""

    ref: Ref
    namespace: Namespace
    name: Name
    version: Version
    digest: Digest
    base_name: Annotated[str, Field(max_length=1000)]
    base_fingerprint: Word
    yanked: StrictBool
    public: StrictBool
    size: Annotated[int, Field(ge=0)]
    rank: Annotated[int, Field(ge=0)]
    license: Annotated[str, Field(max_length=1000)]
    description: Annotated[str, Field(max_length=100_000)]
    created: Word
    published_at: Word
    signed: StrictBool
    tags: list[Tag] = []
    yank_reason: Annotated[str, Field(max_length=1000)] = ""
    checked_bases: list[Word] = []

    @model_validator(mode="after")
    def _ref_is_its_parts(self) -> VersionRow:
        if self.ref != f"{self.namespace}/{self.name}@{self.version}":
            raise ValueError("ref does not match namespace/name@version")
        return self


class FileEntry(_Answer):
    path: Annotated[str, Field(max_length=200)]
    size: Annotated[int, Field(ge=0)]
    sha256: Sha256


class FileListing(_Answer):
    ref: Ref
    digest: Digest
    files: list[FileEntry]


class Shared(_Answer):
    ref: Ref
    shared_with: list[Namespace]


class Readable(_Answer):
    readable: StrictBool


class ErrorDetail(_Answer):
    kind: ErrorKindName
    message: str
    hint: str | None = None


class ErrorBody(_Answer):
    error: ErrorDetail
