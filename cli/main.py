"""`adapterhub`: the command-line front. Each module under cli/ registers its own commands."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="adapterhub",
    help="Train LoRA/QLoRA adapters, pack them as verified bundles, publish them, serve them per tenant.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

from cli import base as _base  # noqa: E402

_base.register(app)

from cli import train as _train  # noqa: E402

_train.register(app)

from cli import serve as _serve  # noqa: E402
from cli import tenant as _tenant  # noqa: E402

_serve.register(app)
_tenant.register(app)

from cli import bundle as _bundle  # noqa: E402
from cli import registry as _registry  # noqa: E402

_bundle.register(app)
_registry.register(app)

from cli import demo as _demo  # noqa: E402

_demo.register(app)
