"""`adapterhub`: the command-line front. Each module under cli/ registers its own commands.

The order below is the order of `adapterhub --help`: the path of one adapter, from training to serving.
"""

from __future__ import annotations

import typer

from cli import base, bundle, cluster, demo, hub, registry, serve, tenant, train

app = typer.Typer(
    name="adapterhub",
    help="Train LoRA/QLoRA adapters, pack them as verified bundles, publish them, serve them per tenant.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

for _module in (demo, base, train, bundle, registry, hub, serve, cluster, tenant):
    _module.register(app)
