"""`adapterhub top`: a live view of a server's tenants, adapters, hot set and cache (serving/top.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import run_cli


def register(app: typer.Typer) -> None:
    @app.command("top")
    @run_cli
    def top(
        server: Annotated[str, typer.Option(help="the server's URL, e.g. http://127.0.0.1:8000")],
        admin_key: Annotated[
            str, typer.Option(envvar="ADAPTERHUB_ADMIN_KEY", help="the server's admin key")
        ],
        interval: Annotated[float, typer.Option(min=0.1, help="seconds between frames")] = 2.0,
        once: Annotated[bool, typer.Option("--once", help="print one frame and exit")] = False,
        limit: Annotated[int, typer.Option(min=1, help="rows per table at most")] = 20,
    ) -> None:
        """Per-tenant and per-adapter requests, tokens/s and errors, and the hot set, refreshed live."""
        from rich.console import Console

        from adapterhub_lite.serving.top import Server, watch

        watch(Server(server, admin_key), interval, once, Console(), limit)
