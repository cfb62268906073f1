"""Names, versions and references: `namespace/name@version` with semantic versions.

The full reference is the name vLLM sees for an adapter, so the rules are strict: short, ASCII, no path
separators, and versions that sort by semver precedence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NoReturn

from adapterhub_lite.errors import AdapterHubError, BundleError

# Matched whole (`fullmatch`): with `re.match` and a trailing `$`, "1.0.0\n" would pass.
_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?")
_TAG_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")
# semver.org's regex, without build metadata (`+...`): two versions differing only in build metadata
# would have the same precedence, so "newest" would be ambiguous.
_SEMVER_RE = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?",
    re.ASCII,  # `\d` is [0-9] only: "1.0.1\u0661" must not pass (int() would read it as 11)
)
DEFAULT_VERSION = "0.1.0"


def _fail(error: type[Exception], message: str, hint: str) -> NoReturn:
    # pydantic validators pass ValueError, which takes no hint: the hint joins the message. Anything
    # else is a project error class or a factory called like one.
    if isinstance(error, type) and not issubclass(error, AdapterHubError):
        raise error(f"{message}; {hint}")
    raise error(message, hint=hint)


def check_name(value: str, what: str = "name", error: type[Exception] = BundleError) -> str:
    """Validate a namespace or adapter name; return it unchanged."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or ".." in value:
        _fail(
            error,
            f"invalid {what} {value!r}",
            f"a {what} is 1-64 characters: letters, digits, '.', '_' or '-', starting and ending "
            "with a letter or digit (no '/', '@' or '..')",
        )
    return value


def check_version(value: str, error: type[Exception] = BundleError) -> str:
    """Validate a semantic version `MAJOR.MINOR.PATCH[-PRERELEASE]`; return it unchanged."""
    if not isinstance(value, str) or len(value) > 64 or not _SEMVER_RE.fullmatch(value):
        _fail(
            error,
            f"invalid version {value!r}",
            "use a semantic version such as 1.0.0 or 2.1.0-rc.1 (no build metadata '+...')",
        )
    return value


def check_tag(value: str, error: type[Exception] = BundleError) -> str:
    if not isinstance(value, str) or not _TAG_RE.fullmatch(value):
        _fail(error, f"invalid tag {value!r}", "a tag is 1-32 lowercase letters, digits, '.', '_' or '-'")
    return value


def semver_key(version: str) -> tuple:
    """Sort key giving semver precedence (a release sorts above its pre-releases)."""
    m = _SEMVER_RE.fullmatch(version) if isinstance(version, str) else None
    if not m:
        raise ValueError(f"not a semantic version: {version!r}")
    major, minor, patch, pre = m.groups()
    if pre is None:
        pre_key: tuple = (1,)
    else:
        # Numeric identifiers sort below alphanumeric ones; a shorter list sorts first when equal so far.
        pre_key = (0, tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split(".")))
    return (int(major), int(minor), int(patch), pre_key)


@dataclass(frozen=True)
class Ref:
    """A parsed adapter reference; `version` is None for "the newest version not yanked"."""

    namespace: str
    name: str
    version: str | None = None

    @property
    def package(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        return self.package + (f"@{self.version}" if self.version else "")


def parse_ref(ref: str, error: type[Exception] = BundleError) -> Ref:
    """Parse `namespace/name@version` or `namespace/name`."""
    if not isinstance(ref, str) or len(ref) > 200:
        raise error(f"invalid reference {ref!r}", hint="use namespace/name@version or namespace/name")
    package, sep, version = ref.partition("@")
    namespace, slash, name = package.partition("/")
    if not slash or not namespace or not name or (sep and not version):
        raise error(
            f"invalid reference {ref!r}",
            hint="use namespace/name@version (e.g. acme/support-bot@1.0.0) or namespace/name for the "
            "newest version",
        )
    check_name(namespace, "namespace", error)
    check_name(name, "name", error)
    if sep:
        check_version(version, error)
    return Ref(namespace, name, version or None)
