"""`adapterhub tenant rollout ...` and `tenant history` against a real registry and tenant store."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tiny_base, lora_dir, tmp_path_factory):
    from adapterhub_lite.bundles import pack_bundle
    from adapterhub_lite.registry import open_registry
    from adapterhub_lite.tenants.store import TenantStore

    root = tmp_path_factory.mktemp("rollout-cli")
    reg = open_registry(root / "registry")
    refs = []
    for version in ("1.0.0", "2.0.0"):
        bundle = pack_bundle(
            lora_dir, root / f"b{version}", namespace="acme", name="bot", version=version, base_dir=tiny_base
        )
        refs.append(reg.publish(bundle).ref)
    db = str(root / "tenants.db")
    store = TenantStore.open(db)
    store.add_tenant("acme")
    store.set_alias("acme", "bot", refs[0])
    return {"db": db, "registry": str(root / "registry"), "refs": refs}


def _run(*args: str):
    return runner.invoke(app, ["tenant", *args])


def test_rollout_commands_walk_the_state_machine_and_history_shows_who_and_why(setup):
    db, reg = ["--db", setup["db"]], ["--registry", setup["registry"]]
    r = _run("rollout", "acme", "bot", "acme/bot@2.0.0", "--canary", "20", *db, *reg)
    assert r.exit_code == 65 and "--eval-file" in r.output  # no gate chosen: refused, nothing stored
    r = _run("rollout", "status", "acme", "bot", *db)
    assert r.exit_code == 66
    r = _run(
        "rollout",
        "acme",
        "bot",
        "acme/bot@2.0.0",
        "--canary",
        "20",
        "--skip-eval",
        *db,
        *reg,
        "--reason",
        "ticket 42",
    )
    assert r.exit_code == 0, r.output
    assert "canary, 20% to acme/bot@2.0.0" in r.output
    r = _run("rollout", "status", "acme", "bot", *db, "--json")
    status = json.loads(r.output)
    assert (status["state"], status["steps"], status["percent"]) == ("canary", [20, 50, 100], 20)
    assert status["eval"]["reason"] == "evaluation gate skipped by operator"
    assert _run("rollout", "pause", "acme", "bot", *db).exit_code == 0
    r = _run("rollout", "advance", "acme", "bot", *db)
    assert r.exit_code == 73 and "paused" in r.output  # CONFLICT: a paused rollout does not advance
    assert _run("rollout", "resume", "acme", "bot", *db).exit_code == 0
    for _ in range(3):
        assert _run("rollout", "advance", "acme", "bot", *db).exit_code == 0
    r = _run("list", *db, "--json")
    assert json.loads(r.output)[0]["aliases"]["bot"] == "acme/bot@2.0.0"  # promoted
    r = _run("history", "acme", *db, "--json")
    trail = [(e["action"], e["actor"]) for e in json.loads(r.output)]
    assert trail == [
        ("alias-moved", "promote"),
        ("started", "cli"),
        ("eval-passed", "cli"),
        ("paused", "cli"),
        ("resumed", "cli"),
        ("step", "cli"),
        ("step", "cli"),
        ("promoted", "cli"),
    ]
    r = _run("history", "acme", "bot", *db)
    assert r.exit_code == 0 and "ticket 42" in r.output and "promoted" in r.output


def test_rollout_bad_input_is_one_line_errors(setup):
    db, reg = ["--db", setup["db"]], ["--registry", setup["registry"]]
    for args, code in [
        (("rollout", "acme"), 65),
        (("rollout", "acme", "bot", "acme/bot@1.0.0", "--steps", "50,10", "--skip-eval"), 65),
        (("rollout", "acme", "bot", "acme/bot@9.9.9", "--skip-eval"), 66),
        (
            ("rollout", "acme", "bot", "acme/bot@1.0.0", "--canary", "5", "--steps", "10,100", "--skip-eval"),
            65,
        ),
        (("rollout", "acme", "bot", "acme/bot@1.0.0", "--eval-file", "/nonexistent.jsonl"), 65),
        (("rollout", "abort", "acme", "nope"), 66),
        (("rollout", "acme", "bot", "acme/bot@1.0.0", "--interval", "5 minutes", "--skip-eval"), 65),
        (("rollout", "acme", "bot", "acme/bot@1.0.0", "--interval", "0.5s", "--skip-eval"), 65),
    ]:
        r = _run(*args, *db, *reg)
        assert r.exit_code == code, (args, r.output)
        assert "Traceback" not in r.output and r.output.startswith("error:"), r.output
