"""One settings module: every ADAPTERHUB_* name is defined there, read there, with one on/off grammar."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from adapterhub_lite.settings import PREFIX, Settings, SettingsError, env_name, settings

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "adapterhub_lite").rglob("*.py"), *(ROOT / "cli").rglob("*.py")])
NAME = re.compile(r"ADAPTERHUB_[A-Z0-9_]*[A-Z0-9]")
BOOLS = sorted(name for name, f in Settings.model_fields.items() if f.annotation is bool)


def test_every_name_in_the_code_is_a_setting():
    known = {env_name(field) for field in Settings.model_fields}
    used = {m for path in SOURCES for m in NAME.findall(path.read_text())}
    assert used - known == set(), "define these in adapterhub_lite/settings.py"


def _reads_environment(node: ast.AST) -> bool:
    """`os.environ.get(...)`, `os.getenv(...)` or `os.environ[...]` (a read, not a write)."""
    if isinstance(node, ast.Call):
        f = node.func
        return isinstance(f, ast.Attribute) and (
            (f.attr == "get" and isinstance(f.value, ast.Attribute) and f.value.attr == "environ")
            or f.attr == "getenv"
        )
    if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
        return isinstance(node.value, ast.Attribute) and node.value.attr == "environ"
    return False


def _names_a_setting(node: ast.AST) -> bool:
    arg = node.args[0] if isinstance(node, ast.Call) and node.args else getattr(node, "slice", None)
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value.startswith(PREFIX)
    name = arg.id if isinstance(arg, ast.Name) else arg.attr if isinstance(arg, ast.Attribute) else ""
    return name.startswith("ENV_") or name.endswith("_SWITCH")


def test_settings_are_read_only_in_the_settings_module():
    readers = []
    for path in SOURCES:
        if path.name == "settings.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if _reads_environment(node) and _names_a_setting(node):
                readers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert readers == [], "read these through adapterhub_lite.settings.settings()"


@pytest.mark.parametrize("field", BOOLS)
@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
        ("1", True),
        ("TRUE", True),
        ("yes", True),
        ("on", True),
    ],
)
def test_one_grammar_for_every_switch(monkeypatch, field, raw, value):
    monkeypatch.setenv(env_name(field), raw)
    assert getattr(settings(), field) is value


@pytest.mark.parametrize("field", BOOLS)
def test_a_switch_that_is_neither_on_nor_off_is_an_error_naming_it(monkeypatch, field):
    monkeypatch.setenv(env_name(field), "maybe")
    with pytest.raises(SettingsError, match=f"^{env_name(field)}='maybe' is not valid"):
        settings()


def test_kv_zeroing_false_turns_zeroing_off(monkeypatch):
    """The grammar bug that started this module: `ADAPTERHUB_KV_ZEROING=false` left zeroing on."""
    from adapterhub_lite.vllm_compat import isolation

    monkeypatch.setenv(isolation.KV_ZEROING_SWITCH, "false")
    assert settings().kv_zeroing is False


def test_a_bad_number_names_the_variable_and_empty_means_unset(monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_CACHE_MAX_MB", "lots")
    with pytest.raises(SettingsError, match="^ADAPTERHUB_CACHE_MAX_MB='lots'"):
        settings()
    monkeypatch.setenv("ADAPTERHUB_CACHE_MAX_MB", "")
    assert settings().cache_max_mb == Settings.model_fields["cache_max_mb"].default
    monkeypatch.setenv("ADAPTERHUB_CACHE_MAX_MB", "0")
    with pytest.raises(SettingsError, match="ADAPTERHUB_CACHE_MAX_MB"):
        settings()


def test_serving_config_reads_the_settings(monkeypatch):
    from adapterhub_lite.serving.config import ServingConfig

    monkeypatch.setenv("ADAPTERHUB_WARMUP", "off")
    monkeypatch.setenv("ADAPTERHUB_IDLE_SECONDS", "42")
    config = ServingConfig.from_env()
    assert config.warmup is False and config.idle_seconds == 42
    assert ServingConfig(**{**config.__dict__}).to_env()["ADAPTERHUB_WARMUP"] == "0"


def test_the_hub_and_a_server_default_to_different_ports():
    """Both on one machine out of the box: the hub's default port is not the server's."""
    import click
    import typer

    from adapterhub_lite.settings import HUB_PORT, SERVE_PORT
    from cli.main import app

    root = typer.main.get_command(app)
    ctx = click.Context(root)

    def default_port(*path: str) -> int:
        cmd = root
        for name in path:
            cmd = cmd.get_command(ctx, name)
        return next(p.default for p in cmd.params if p.name == "port")

    assert HUB_PORT != SERVE_PORT
    assert default_port("serve") == SERVE_PORT
    assert default_port("hub", "serve") == HUB_PORT
