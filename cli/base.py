"""`adapterhub base ...`: inspect a base model directory (fingerprint, shape)."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import print_json, run_cli


def register(app: typer.Typer) -> None:
    base_app = typer.Typer(help="Inspect base models (the embedded one or any local HF directory).")
    app.add_typer(base_app, name="base")

    @base_app.command("info")
    @run_cli
    def info(
        model_dir: Annotated[
            str | None, typer.Argument(help="a local model directory; default: the embedded base")
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    ) -> None:
        """Check a base model and show its fingerprint (what bundles pin), architecture and size."""
        from adapterhub_lite.base.info import describe_base

        data = describe_base(model_dir)
        if as_json:
            print_json(data)
        else:
            for k, v in data.items():
                typer.echo(f"{k:>18}: {v}")
