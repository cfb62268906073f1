"""`adapterhub base ...`: inspect a base model directory (fingerprint, shape)."""

from __future__ import annotations

import json
from pathlib import Path
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
        """Show a base model's fingerprint (what bundles pin), architecture and size."""
        from adapterhub_lite.base import fingerprint, resolve_base_dir

        path = resolve_base_dir(model_dir)
        config = json.loads((path / "config.json").read_text())
        weights = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
        data = {
            "path": str(path),
            "fingerprint": fingerprint(path),
            "architectures": config.get("architectures"),
            "model_type": config.get("model_type"),
            "hidden_size": config.get("hidden_size"),
            "num_hidden_layers": config.get("num_hidden_layers"),
            "weights_bytes": weights,
        }
        if as_json:
            print_json(data)
        else:
            for k, v in data.items():
                typer.echo(f"{k:>18}: {v}")
