"""What every command shares: turning project errors into a clean message and an exit code."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from adapterhub_lite.errors import AdapterHubError

F = TypeVar("F", bound=Callable[..., Any])


def run_cli(fn: F) -> F:
    """Decorate a command: an AdapterHubError prints `error: ...` (+ hint) and exits 1, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AdapterHubError as exc:
            typer.secho(f"error: {exc.message}", err=True, fg=typer.colors.RED)
            if exc.hint:
                typer.echo(f"  hint: {exc.hint}", err=True)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def print_json(data: Any) -> None:
    """Machine-readable output for `--json` flags."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
