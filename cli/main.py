"""`adapterhub`: the command-line front. Each module under cli/ registers its own commands.

A command's module is imported only when that command runs (or when help lists every command), so
`adapterhub base info` does not pay for importing the server, the database layer or the hub client.
`COMMANDS` is the order of `adapterhub --help`: the path of one adapter, from training to serving
(plain commands first, then command groups, as typer lists them).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping

import typer
from typer.core import TyperCommand, TyperGroup

# command name -> the module under cli/ that registers it (tests/test_cli_lazy.py keeps this exact).
COMMANDS: dict[str, str] = {
    "demo": "demo",
    "train": "train",
    "eval": "train",
    "pack": "bundle",
    "verify": "bundle",
    "sign": "bundle",
    "publish": "registry",
    "pull": "registry",
    "search": "registry",
    "list": "registry",
    "show": "registry",
    "yank": "registry",
    "share": "registry",
    "login": "hub",
    "serve": "serve",
    "base": "base",
    "keys": "bundle",
    "registry": "registry",
    "hub": "hub",
    "cluster": "cluster",
    "tenant": "tenant",
    "usage": "usage",
    "top": "top",
}


def module_commands(module: str) -> dict[str, TyperCommand | TyperGroup]:
    """The click commands that `cli.<module>.register` defines, by name."""
    sub = typer.Typer()
    importlib.import_module(f"cli.{module}").register(sub)
    return dict(typer.main.get_group(sub).commands)


class _LazyCommands(MutableMapping):
    """The top-level commands, each built from its module on first access."""

    def __init__(self) -> None:
        self._built: dict = {}

    def __getitem__(self, name: str):
        if name not in self._built:
            self._built.update(module_commands(COMMANDS[name]))  # KeyError: no such command
        return self._built[name]

    def __setitem__(self, name: str, command) -> None:
        self._built[name] = command

    def __delitem__(self, name: str) -> None:
        del self._built[name]

    def __iter__(self) -> Iterator[str]:
        return iter({**dict.fromkeys(COMMANDS), **self._built})

    def __len__(self) -> int:
        return len(set(COMMANDS) | set(self._built))


class _LazyGroup(TyperGroup):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.commands = _LazyCommands()


app = typer.Typer(
    name="adapterhub",
    help="Train LoRA/QLoRA adapters, pack them as verified bundles, publish them, serve them per tenant.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=_LazyGroup,
)


@app.callback()
def _root() -> None:
    # A callback makes typer build a group even though no command is registered here.
    pass
