"""The project's own error types.

Every error a user can cause is one of these: the message says what is wrong, `hint` says what to do.
The CLI prints them without a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class AdapterHubError(Exception):
    """Base class of all user-facing errors."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


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
    """A registry operation failed (unknown reference, immutable version, bad name...)."""


class ServingError(AdapterHubError):
    """The server cannot be launched or an adapter cannot be served."""


@contextmanager
def os_errors_as(error: type[AdapterHubError], what: str, hint: str) -> Iterator[None]:
    """Turn an OSError inside the block into `error` naming the file: users never see a traceback."""
    try:
        yield
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise error(f"{what}: {where}{exc.strerror or exc}", hint=hint) from None
