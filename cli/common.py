"""What every command shares: turning project errors into a clean message and an exit code."""

from __future__ import annotations

import enum
import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from adapterhub_lite.display import safe_block
from adapterhub_lite.errors import AdapterHubError, ErrorKind

F = TypeVar("F", bound=Callable[..., Any])

# Exit codes by kind of error (BSD sysexits.h), so scripts can tell "fix your input" from "retry later".
EXIT_CODES: dict[ErrorKind, int] = {
    ErrorKind.INVALID: 65,  # EX_DATAERR
    ErrorKind.NOT_FOUND: 66,  # EX_NOINPUT
    ErrorKind.CONFLICT: 73,  # EX_CANTCREAT
    ErrorKind.UNAUTHENTICATED: 77,  # EX_NOPERM
    ErrorKind.FORBIDDEN: 77,  # EX_NOPERM
    ErrorKind.LIMITED: 75,  # EX_TEMPFAIL
    ErrorKind.UNAVAILABLE: 69,  # EX_UNAVAILABLE
    ErrorKind.INTERNAL: 74,  # EX_IOERR
}


class RateLimitFailure(enum.StrEnum):
    """`--rate-limit-failure` of `serve` and `cluster up`: what limits do while Redis is unreachable."""

    open = "open"  # admit
    closed = "closed"  # answer 503


DEFAULT_RATE_LIMIT_FAILURE = RateLimitFailure.open  # as ServingConfig.rate_limit_failure


def run_cli(fn: F) -> F:
    """Decorate a command: an AdapterHubError prints `error: ...` (+ hint) and exits with its kind's code.

    Messages may quote bundle or request strings; they are escaped here so none reaches the terminal raw.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AdapterHubError as exc:
            typer.secho(f"error: {safe_block(exc.message)}", err=True, fg=typer.colors.RED)
            if exc.hint:
                typer.echo(f"  hint: {safe_block(exc.hint)}", err=True)
            raise typer.Exit(code=EXIT_CODES[exc.kind]) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def print_json(data: Any) -> None:
    """Machine-readable output for `--json` flags."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
