"""Scoped trust is the default (issue 20, item 12).

`adapterhub registry trust KEY` used to trust a key for every namespace unless told otherwise, so a
registry that trusted two teams' keys let either team publish under the other's namespace (a bundle
signed by globex's key became the newest `acme/geo`). Now the command needs `--namespace NS` or an
explicit `--all-namespaces`; older configs with all-namespace keys keep working and `registry check`
names those keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterhub_lite.bundles import pack_bundle
from adapterhub_lite.bundles.signing import generate_key
from adapterhub_lite.errors import ErrorKind
from adapterhub_lite.registry import open_registry
from cli.common import EXIT_CODES
from cli.main import app


@pytest.fixture
def env(tmp_path, monkeypatch, lora_dir, tiny_base):
    monkeypatch.setenv("ADAPTERHUB_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("ADAPTERHUB_REGISTRY", str(tmp_path / "registry"))
    open_registry(tmp_path / "registry")
    keys = {name: generate_key(name) for name in ("acme-key", "globex-key", "ops-key")}

    def signed(namespace: str, version: str, key: str) -> Path:
        return pack_bundle(
            lora_dir,
            tmp_path / f"{namespace}-{version}-{key}",
            namespace=namespace,
            name="geo",
            version=version,
            base_dir=tiny_base,
            signing_key=key,
            vllm_check=False,
        )

    return tmp_path, keys, signed


def _trusted(tmp_path: Path) -> list:
    return open_registry(tmp_path / "registry").trusted.keys


def test_trust_without_a_namespace_is_refused_with_what_to_do(env):
    tmp_path, _, _ = env
    runner = CliRunner()
    res = runner.invoke(app, ["registry", "trust", "acme-key"])
    assert res.exit_code == EXIT_CODES[ErrorKind.INVALID], res.output
    assert "--namespace" in res.output and "--all-namespaces" in res.output and "Traceback" not in res.output
    assert _trusted(tmp_path) == []  # nothing was trusted
    res = runner.invoke(app, ["registry", "trust", "acme-key", "--namespace", "acme", "--all-namespaces"])
    assert res.exit_code == EXIT_CODES[ErrorKind.INVALID] and _trusted(tmp_path) == []


def test_two_teams_keys_cannot_publish_under_each_others_namespace(env):
    """The attack: both teams' keys trusted the way an operator types it; globex signs `acme/geo`."""
    tmp_path, _, signed = env
    runner = CliRunner()
    for key, namespace in (("acme-key", "acme"), ("globex-key", "globex")):
        # Typed as before (no namespace): once trusted for every namespace, now refused.
        assert runner.invoke(app, ["registry", "trust", key]).exit_code == EXIT_CODES[ErrorKind.INVALID]
        res = runner.invoke(app, ["registry", "trust", key, "--namespace", namespace])
        assert res.exit_code == 0 and res.output.strip().endswith(f"for {namespace}"), res.output
    assert runner.invoke(app, ["publish", str(signed("acme", "1.0.0", "acme-key"))]).exit_code == 0
    assert runner.invoke(app, ["publish", str(signed("globex", "1.0.0", "globex-key"))]).exit_code == 0
    res = runner.invoke(app, ["publish", str(signed("acme", "1.0.1", "globex-key"))])
    assert res.exit_code == EXIT_CODES[ErrorKind.FORBIDDEN], res.output
    assert "not trusted for namespace 'acme'" in res.output and "Traceback" not in res.output
    assert open_registry(tmp_path / "registry").resolve("acme/geo").version == "1.0.0"


def test_all_namespaces_is_explicit_and_loud_and_flagged_by_check(env):
    tmp_path, _, signed = env
    runner = CliRunner()
    res = runner.invoke(app, ["registry", "trust", "ops-key", "--all-namespaces"])
    assert res.exit_code == 0 and "EVERY namespace" in res.output, res.output
    assert runner.invoke(app, ["publish", str(signed("acme", "1.0.0", "ops-key"))]).exit_code == 0
    res = runner.invoke(app, ["registry", "check"])
    assert res.exit_code == 0 and "trusted for every namespace" in res.output, res.output
    report = json.loads(runner.invoke(app, ["registry", "check", "--json"]).stdout)
    assert len(report["unscoped_keys"]) == 1 and report["ok"] is True


def test_an_old_config_with_an_unscoped_key_keeps_working_and_is_flagged(env):
    """Registries stored keys as bare hex (trusted everywhere): they still verify, and check names them."""
    tmp_path, keys, signed = env
    reg = open_registry(tmp_path / "registry")
    reg.trust(keys["ops-key"].public_key)  # the library call an older CLI made: a bare hex entry
    reg.trust(keys["acme-key"].public_key, ["acme"])
    assert reg.publish(signed("globex", "1.0.0", "ops-key")).ref == "globex/geo@1.0.0"
    report = reg.check()
    assert report.unscoped_keys == reg.trusted.unscoped() and len(report.unscoped_keys) == 1
    assert report.ok  # a warning, not a failure: the registry is not damaged
    res = CliRunner().invoke(app, ["registry", "check"])
    assert res.exit_code == 0 and res.output.count("trusted for every namespace") == 1
