"""`adapterhub demo`: the whole path on the embedded base, from nothing, in a few minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import run_cli


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @run_cli
    def demo(
        workdir: Annotated[
            Path, typer.Option(help="where runs, bundles, the registry and the tenants are kept")
        ] = Path(".adapterhub-demo"),
        method: Annotated[str, typer.Option(help="qlora (4-bit NF4 base) or lora")] = "qlora",
        verbose: Annotated[
            bool, typer.Option("--verbose", "-v", help="also show third-party warnings and loader bars")
        ] = False,
    ) -> None:
        """Train, pack, sign, publish, serve per tenant with vLLM, hot-swap live, and show the metrics."""
        from adapterhub_lite.demo import run_demo
        from adapterhub_lite.quiet import quiet_third_party

        with quiet_third_party(verbose):
            run_demo(workdir, method=method, log=typer.echo)
