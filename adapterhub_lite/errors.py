"""The project's own error types.

Every error a user can cause is one of these: the message says what is wrong, `hint` says what to do.
Each error carries its subsystem (the class) and its *kind* (what went wrong, whatever the subsystem):
the HTTP status and the CLI exit code follow from the kind, in one place each (`http_status` here,
`cli.common.EXIT_CODES` for the CLI). The CLI prints errors without a traceback.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager


class ErrorKind(enum.StrEnum):
    """What went wrong, independent of the subsystem that noticed it."""

    INVALID = "invalid"  # the input is malformed, tampered or not acceptable (a client's fault)
    NOT_FOUND = "not_found"  # the thing named does not exist (or may not be seen by the caller)
    CONFLICT = "conflict"  # the request contradicts existing state (immutable version, race lost)
    UNAUTHENTICATED = "unauthenticated"  # no credentials or unknown credentials
    FORBIDDEN = "forbidden"  # known caller, not allowed to do this
    LIMITED = "limited"  # a rate limit or quota is exhausted; retry later
    UNAVAILABLE = "unavailable"  # a dependency is down, locked or full; retry later (server side)
    INTERNAL = "internal"  # a failure on our side that the caller cannot fix (disk full, I/O error)


_HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID: 422,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.LIMITED: 429,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.INTERNAL: 500,
}


class AdapterHubError(Exception):
    """Base class of all user-facing errors.

    `kind` defaults to the class's `default_kind`; pass it where one subsystem raises several kinds
    (a registry lookup that finds nothing is NOT_FOUND, a locked index is UNAVAILABLE).
    `retry_after` (seconds) travels with LIMITED and UNAVAILABLE errors to the HTTP layer.
    """

    default_kind: ErrorKind = ErrorKind.INVALID

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        kind: ErrorKind | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.kind = kind or self.default_kind
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


def http_status(error: AdapterHubError) -> int:
    """The HTTP status an error of this kind answers with (the one mapping for every server)."""
    return _HTTP_STATUS[error.kind]


class BaseModelError(AdapterHubError):
    """A base model directory is missing, unreadable or not a causal LM."""


class RecipeError(AdapterHubError):
    """A training recipe is invalid."""


class DatasetError(AdapterHubError):
    """A dataset file is malformed; the message names `file:line`."""


class TrainingError(AdapterHubError):
    """Training cannot start or continue (e.g. a checkpoint that does not match the recipe)."""


class BundleError(AdapterHubError):
    """A bundle is malformed, tampered, unsigned where a signature is required, or not servable."""


class RegistryError(AdapterHubError):
    """A registry operation failed (unknown reference, immutable version, bad name, index locked...)."""

    default_kind = ErrorKind.NOT_FOUND


class ServingError(AdapterHubError):
    """The server cannot be launched or an adapter cannot be served."""

    default_kind = ErrorKind.UNAVAILABLE


@contextmanager
def os_errors_as(
    error: type[AdapterHubError], what: str, hint: str, kind: ErrorKind = ErrorKind.INTERNAL
) -> Iterator[None]:
    """Turn an OSError inside the block into `error` naming the file: users never see a traceback.

    An OSError is the machine's fault (disk full, permissions), not the input's, hence INTERNAL by
    default; pass `kind=ErrorKind.INVALID` where the OSError means the user named a bad path.
    """
    try:
        yield
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise error(f"{what}: {where}{exc.strerror or exc}", hint=hint, kind=kind) from None
