"""Serving errors carry the kind of what happened (issue 21, item 6).

`ServingError` defaults to UNAVAILABLE (503 "retry later", exit 69). Bad input raised with that default
told clients and scripts to retry what can never succeed: a bad flag or setting, a yanked version, a
tenant that may not use an adapter. Every raise site under `adapterhub_lite/serving/` now names its
kind; bad input is INVALID (4xx, exit 65), a refused tenant FORBIDDEN.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterhub_lite import errors
from adapterhub_lite.bundles import pack_bundle
from adapterhub_lite.errors import ErrorKind, ServingError
from adapterhub_lite.registry import open_registry
from cli.common import EXIT_CODES
from cli.main import app

PACKAGE = Path(errors.__file__).parent
SERVING = [PACKAGE / "serving", PACKAGE / "tenants"]  # serving and the tenant store it answers from
_ERROR_CLASSES = {
    name
    for name, obj in vars(errors).items()
    if inspect.isclass(obj) and issubclass(obj, errors.AdapterHubError)
}


def _raise_sites(path: Path) -> list[tuple[int, str, bool]]:
    """(line, class, passes kind=) for every construction of a project error in `path`."""
    sites = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            if name in _ERROR_CLASSES:
                sites.append((node.lineno, name, any(k.arg == "kind" for k in node.keywords)))
    return sites


def _files() -> list:
    return sorted(p for root in SERVING for p in root.rglob("*.py"))


@pytest.mark.parametrize("path", _files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_serving_error_names_its_kind(path):
    missing = [f"{path.name}:{line} {cls}" for line, cls, has_kind in _raise_sites(path) if not has_kind]
    assert not missing, "pass kind=ErrorKind.<what happened> (bad input is INVALID):\n" + "\n".join(missing)


def test_the_walk_sees_the_raise_sites():
    """Guard on the walk: it finds the serving errors this file is about."""
    found = {(p.name, cls) for p in _files() for _, cls, _ in _raise_sites(p)}
    assert {
        ("view.py", "ServingError"),
        ("launcher.py", "ServingError"),
        ("store.py", "ServingError"),
    } <= found


@pytest.fixture
def world(tmp_path, lora_dir, tiny_base, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_REGISTRY", str(tmp_path / "registry"))
    monkeypatch.setenv("ADAPTERHUB_TENANTS_DB", str(tmp_path / "tenants.db"))
    reg = open_registry(tmp_path / "registry")
    for namespace, version in (("acme", "1.0.0"), ("acme", "1.1.0"), ("globex", "1.0.0")):
        bundle = pack_bundle(
            lora_dir, tmp_path / f"{namespace}-{version}", namespace=namespace, name="geo",
            version=version, base_dir=tiny_base, vllm_check=False,
        )  # fmt: skip
        reg.publish(bundle)
    runner = CliRunner()
    assert runner.invoke(app, ["tenant", "add", "acme"]).exit_code == 0
    return reg, runner


def test_promoting_a_yanked_version_is_invalid_not_retry_later(world):
    reg, runner = world
    reg.yank("acme/geo@1.1.0")
    res = runner.invoke(app, ["tenant", "promote", "acme", "geo", "acme/geo@1.1.0"])
    assert res.exit_code == EXIT_CODES[ErrorKind.INVALID], res.output
    assert "yanked" in res.output and "Traceback" not in res.output


def test_a_tenant_that_may_not_use_an_adapter_is_forbidden(world):
    _, runner = world
    res = runner.invoke(app, ["tenant", "promote", "acme", "geo", "globex/geo@1.0.0"])
    assert res.exit_code == EXIT_CODES[ErrorKind.FORBIDDEN], res.output
    assert "may not use" in res.output and "Traceback" not in res.output


def test_a_bad_setting_is_invalid(monkeypatch):
    from adapterhub_lite.serving.config import ENV_IDLE_SECONDS, ServingConfig

    monkeypatch.setenv(ENV_IDLE_SECONDS, "ten")
    with pytest.raises(errors.AdapterHubError) as e:  # ServingError here; the settings module's own
        ServingConfig.from_env()  # error once settings are read in one place: either way INVALID
    assert ENV_IDLE_SECONDS in e.value.message and "ten" in e.value.message
    assert e.value.kind is ErrorKind.INVALID and errors.http_status(e.value) == 422


def test_an_unknown_served_base_is_invalid(tmp_path):
    from adapterhub_lite.serving.config import ServingConfig
    from adapterhub_lite.serving.plugin.resolver import AdapterResolver

    resolver = AdapterResolver(ServingConfig(base_dir=None), registry=open_registry(tmp_path / "r"))
    with pytest.raises(ServingError, match="base model directory is unknown") as e:
        resolver.base_fingerprint()
    assert e.value.kind is ErrorKind.INVALID
