"""Registry: publish, resolve, pull, search, yank, sharing, trusted keys, fsspec blob stores, check, CLI."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import bundle_fixtures as fx
import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from adapterhub_lite.bundles import pack_bundle, verify_bundle
from adapterhub_lite.bundles.signing import generate_key
from adapterhub_lite.errors import ErrorKind, RegistryError
from adapterhub_lite.registry import Registry, open_registry


@pytest.fixture(scope="module")
def bundles(lora_dir, tiny_base, tmp_path_factory) -> dict[str, Path]:
    """acme/bot at several versions (dirs and one archive), and another adapter claiming acme/bot@1.0.0."""
    root = tmp_path_factory.mktemp("reg-bundles")
    out = {}
    for v in ("1.0.0", "1.2.0", "1.10.0", "2.0.0-rc.1"):
        out[v] = pack_bundle(
            lora_dir,
            root / v,
            namespace="acme",
            name="bot",
            version=v,
            base_dir=tiny_base,
            tags=["support"],
            description="answers support tickets",
            vllm_check=False,
        )
    out["archive"] = pack_bundle(
        lora_dir,
        root / "a.tar",
        namespace="acme",
        name="bot",
        version="3.0.0",
        base_dir=tiny_base,
        archive=True,
        vllm_check=False,
    )
    other = fx.make_adapter(tiny_base, root / "other-adapter", seed=7)
    out["impostor"] = pack_bundle(
        other,
        root / "impostor",
        namespace="acme",
        name="bot",
        version="1.0.0",
        base_dir=tiny_base,
        vllm_check=False,
    )
    out["globex"] = pack_bundle(
        lora_dir,
        root / "globex",
        namespace="globex",
        name="translator",
        version="0.1.0",
        base_dir=tiny_base,
        tags=["fr"],
        vllm_check=False,
    )
    return out


@dataclass(frozen=True)
class Where:
    location: str  # what --registry / open_registry take
    blobs: Path  # where that registry's blobs are


@pytest.fixture
def where(backend, tmp_path, request) -> Where:
    """A fresh registry location on each backend: a directory (SQLite index inside), or a new
    PostgreSQL database created with its blobs in a local folder."""
    if backend == "sqlite":
        return Where(str(tmp_path / "registry"), tmp_path / "registry" / "blobs")
    url = request.getfixturevalue("postgres").new_database()
    open_registry(url, blobs=str(tmp_path / "pg-blobs"))
    return Where(url, tmp_path / "pg-blobs")


@pytest.fixture
def reg(where) -> Registry:
    return open_registry(where.location)


def test_publish_resolve_pull(reg, bundles, tiny_base, tmp_path):
    p = reg.publish(bundles["1.0.0"])
    m = verify_bundle(bundles["1.0.0"], vllm_check=False)
    assert (p.ref, p.digest, p.base_fingerprint) == ("acme/bot@1.0.0", m.digest, m.base.fingerprint)
    assert not p.yanked and not p.public and p.tags == ("support",)
    assert reg.publish(bundles["1.0.0"]) == p  # identical content: idempotent
    dest = reg.pull("acme/bot@1.0.0", tmp_path / "pulled", vllm_check=False)
    assert verify_bundle(dest, base_dir=tiny_base, vllm_check=False).digest == p.digest
    assert sorted(x.name for x in dest.iterdir()) == sorted(x.name for x in bundles["1.0.0"].iterdir())
    # Pulling again into the same directory: verified, not downloaded again.
    mtime = (dest / "adapter_model.safetensors").stat().st_mtime_ns
    assert reg.pull("acme/bot", dest, vllm_check=False) == dest
    assert (dest / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".")] == []


def test_versions_are_immutable(reg, bundles):
    reg.publish(bundles["1.0.0"])
    with pytest.raises(RegistryError, match=r"acme/bot@1\.0\.0 is already published with other content") as e:
        reg.publish(bundles["impostor"])
    assert "new version" in e.value.hint
    assert reg.resolve("acme/bot@1.0.0").digest == verify_bundle(bundles["1.0.0"], vllm_check=False).digest


def test_newest_version_semver_and_yank(reg, bundles):
    for v in ("1.2.0", "1.10.0", "1.0.0", "2.0.0-rc.1"):
        reg.publish(bundles[v])
    assert reg.resolve("acme/bot").version == "1.10.0"  # semver, not string order; pre-releases skipped
    reg.yank("acme/bot@1.10.0", reason="bad answers")
    assert reg.resolve("acme/bot").version == "1.2.0"
    y = reg.resolve("acme/bot@1.10.0")  # an exact version stays resolvable, flagged
    assert y.yanked and y.yank_reason == "bad answers"
    assert [p.version for p in reg.versions("acme")] == ["1.0.0", "1.2.0", "1.10.0", "2.0.0-rc.1"]
    with pytest.raises(RegistryError, match="yank needs an exact version"):
        reg.yank("acme/bot")
    for v in ("1.0.0", "1.2.0"):
        reg.yank(f"acme/bot@{v}")
    assert reg.resolve("acme/bot").version == "2.0.0-rc.1"  # only a pre-release is left
    reg.yank("acme/bot@2.0.0-rc.1")
    with pytest.raises(RegistryError, match="every version is yanked"):
        reg.resolve("acme/bot")
    reg.yank("acme/bot@1.2.0", undo=True)
    assert reg.resolve("acme/bot").version == "1.2.0"


def test_unknown_refs_and_bad_refs(reg, bundles):
    reg.publish(bundles["1.0.0"])
    with pytest.raises(RegistryError, match=r"no acme/bot@9\.9\.9 in the registry") as e:
        reg.resolve("acme/bot@9.9.9")
    assert "1.0.0" in e.value.hint
    with pytest.raises(RegistryError, match="invalid reference"):
        reg.resolve("acme")
    with pytest.raises(RegistryError, match="invalid version") as e:
        reg.resolve("acme/bot@v1")
    assert e.value.kind is ErrorKind.INVALID


def test_archive_publish(reg, bundles, tmp_path):
    p = reg.publish(bundles["archive"])
    assert p.ref == "acme/bot@3.0.0"
    assert (
        verify_bundle(reg.pull(p.ref, tmp_path / "x", vllm_check=False), vllm_check=False).digest == p.digest
    )


def test_search_list_namespaces(reg, bundles):
    for key in ("1.0.0", "1.2.0", "globex"):
        reg.publish(bundles[key])
    assert [p.ref for p in reg.search("bot")] == ["acme/bot@1.2.0"]  # newest per adapter
    assert reg.search("%") == [] and reg.search("_") == [] and len(reg.search("BOT")) == 1  # literal text
    assert [p.ref for p in reg.search("tickets")] == ["acme/bot@1.2.0"]  # description
    assert [p.ref for p in reg.search("", tag="fr")] == ["globex/translator@0.1.0"]
    fp = reg.resolve("acme/bot").base_fingerprint
    assert len(reg.search("", base=fp)) == 2 and reg.search("", base="sha256:" + "0" * 64) == []
    assert reg.namespaces() == ["acme", "globex"]
    assert [p.ref for p in reg.versions("globex")] == ["globex/translator@0.1.0"]


def test_sharing_and_public(reg, bundles):
    reg.publish(bundles["1.0.0"])
    assert reg.can_read("acme", "acme/bot@1.0.0") and reg.can_read("acme", "acme/bot")
    assert not reg.can_read("globex", "acme/bot@1.0.0")
    assert not reg.can_read("acme", "acme/bot@7.0.0") and not reg.can_read("acme", "acme/nothing")
    assert not reg.can_read("acme", "not a ref")
    reg.publish(bundles["globex"])
    fp = reg.resolve("acme/bot").base_fingerprint

    def readable(namespace: str, base: str | None = None) -> list[str]:
        return [p.ref for p in reg.readable(namespace, base)]

    assert readable("globex") == ["globex/translator@0.1.0"] and readable("initech") == []
    reg.share("acme/bot", "globex")
    assert reg.can_read("globex", "acme/bot@1.0.0") and not reg.can_read("initech", "acme/bot@1.0.0")
    assert reg.shared_with("acme/bot") == ["globex"]
    assert readable("globex") == ["acme/bot@1.0.0", "globex/translator@0.1.0"] == readable("globex", fp)
    assert readable("globex", "sha256:" + "0" * 64) == []
    reg.yank("acme/bot@1.0.0")
    assert readable("globex") == ["globex/translator@0.1.0"]  # nothing left to name `acme/bot` by
    reg.yank("acme/bot@1.0.0", undo=True)
    reg.share("acme/bot", "globex", revoke=True)
    assert not reg.can_read("globex", "acme/bot@1.0.0") and readable("globex") == ["globex/translator@0.1.0"]
    reg.set_public("acme/bot@1.0.0", True)
    assert reg.can_read("initech", "acme/bot@1.0.0") and reg.resolve("acme/bot").public
    assert readable("initech") == ["acme/bot@1.0.0"]
    with pytest.raises(RegistryError, match="no adapter acme/ghost"):
        reg.share("acme/ghost", "globex")


def test_trusted_keys_required(where, tmp_path, bundles, lora_dir, tiny_base, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_CONFIG_DIR", str(tmp_path / "cfg"))
    key = generate_key("team")
    reg = open_registry(where.location)
    reg.trust(key.public_key)
    reg = open_registry(where.location)  # the trust is remembered
    with pytest.raises(RegistryError, match="refusing to publish .*unsigned"):
        reg.publish(bundles["1.0.0"])
    signed = pack_bundle(
        lora_dir,
        tmp_path / "signed",
        namespace="acme",
        name="bot",
        version="1.0.0",
        base_dir=tiny_base,
        signing_key="team",
        vllm_check=False,
    )
    p = reg.publish(signed)
    assert p.signed
    dest = reg.pull(p.ref, tmp_path / "pulled", vllm_check=False)
    assert (dest / "signatures.json").is_file()


@pytest.mark.parametrize("store", ["memory", "dirfs"])
def test_fsspec_blob_stores(tmp_path, bundles, store):
    if store == "memory":
        blobs = f"memory://adapterhub-test-{os.getpid()}-{tmp_path.name}"
    else:
        (tmp_path / "bucket").mkdir()
        blobs = DirFileSystem(path=str(tmp_path / "bucket"), fs=LocalFileSystem())
    reg = open_registry(tmp_path / "registry", blobs=blobs)
    p = reg.publish(bundles["1.0.0"])
    assert not (tmp_path / "registry" / "blobs").exists()  # the bytes went to the fsspec store
    if store == "dirfs":
        assert len(list((tmp_path / "bucket" / "sha256").rglob("*"))) >= 4
        assert not list((tmp_path / "bucket" / "tmp").iterdir())
    dest = reg.pull(p.ref, tmp_path / "pulled", vllm_check=False)
    assert verify_bundle(dest, vllm_check=False).digest == p.digest
    assert reg.check().ok


def test_blob_url_is_remembered_and_conflicts_refused(tmp_path, bundles):
    url = f"memory://adapterhub-remember-{os.getpid()}"
    open_registry(tmp_path / "r", blobs=url).publish(bundles["1.0.0"])
    assert open_registry(tmp_path / "r").blobs.url == url
    with pytest.raises(RegistryError, match="stores its blobs in"):
        open_registry(tmp_path / "r", blobs="memory://elsewhere")
    with pytest.raises(RegistryError, match="unknown scheme 's3'") as e:
        open_registry("s3://bucket/registry")
    assert e.value.kind is ErrorKind.INVALID and "postgresql://" in e.value.hint


def test_location_from_env(tmp_path, monkeypatch, bundles):
    monkeypatch.setenv("ADAPTERHUB_REGISTRY", str(tmp_path / "env-reg"))
    open_registry().publish(bundles["1.0.0"])
    assert (tmp_path / "env-reg" / "index.sqlite").is_file()
    with pytest.raises(RegistryError, match="no registry at"):
        open_registry(tmp_path / "missing", create=False)


def test_check_finds_missing_and_corrupt_blobs(where, reg, bundles, tiny_base, tmp_path):
    p = reg.publish(bundles["1.0.0"])
    m = verify_bundle(bundles["1.0.0"], vllm_check=False)
    sha = m.file("adapter_model.safetensors").sha256
    blob = where.blobs / "sha256" / sha[:2] / sha
    data = blob.read_bytes()
    blob.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    report = reg.check(deep=True)
    assert report.corrupt_blobs == [str(blob)] and not report.ok
    with pytest.raises(RegistryError, match="is corrupt"):
        reg.pull(p.ref, tmp_path / "x", vllm_check=False)
    assert not (tmp_path / "x").exists()
    blob.unlink()
    report = reg.check()
    assert report.missing_blobs == [
        {"blob": f"sha256:{sha}", "file": "acme/bot@1.0.0:adapter_model.safetensors"}
    ]
    reg.publish(bundles["1.0.0"])  # publishing the same bundle again restores it
    assert reg.check(deep=True).ok
    # Pull verifies against the base the server runs.
    with pytest.raises(RegistryError, match="was trained on base model"):
        reg.pull(p.ref, tmp_path / "y", base_fingerprint="sha256:" + "1" * 64, vllm_check=False)


def test_cli_registry_commands(where, tmp_path, bundles):
    from typer.testing import CliRunner

    from cli.common import EXIT_CODES
    from cli.main import app

    runner = CliRunner()
    r_opt = ["--registry", where.location]

    def run(*args: str, code: int = 0):
        res = runner.invoke(app, [*args, *r_opt])
        assert res.exit_code == code, res.output
        assert "Traceback" not in res.output
        return res

    assert json.loads(run("publish", str(bundles["1.0.0"]), "--json").stdout)["ref"] == "acme/bot@1.0.0"
    run("publish", str(bundles["1.2.0"]))
    res = run("publish", str(bundles["impostor"]), code=EXIT_CODES[ErrorKind.CONFLICT])
    assert "error: acme/bot@1.0.0 is already published with other content" in res.output
    assert [p["ref"] for p in json.loads(run("search", "bot", "--json").stdout)] == ["acme/bot@1.2.0"]
    shown = json.loads(run("show", "acme/bot@1.0.0", "--json").stdout)
    assert shown["adapter"]["rank"] == 4 and shown["shared_with"] == []
    assert len(json.loads(run("list", "acme", "--json").stdout)) == 2
    run("share", "acme/bot", "--with", "globex")
    run("share", "acme/bot", "--public")
    assert json.loads(run("show", "acme/bot", "--json").stdout)["public"] is True
    run("yank", "acme/bot@1.2.0", "--reason", "oops")
    pulled = json.loads(run("pull", "acme/bot", "--dest", str(tmp_path / "p"), "--json").stdout)
    assert pulled["version"] == "1.0.0" and Path(pulled["path"]).is_dir()
    assert json.loads(run("registry", "check", "--json").stdout)["ok"] is True
    res = run("pull", "acme/nope", code=EXIT_CODES[ErrorKind.NOT_FOUND])
    assert "error: no acme/nope in the registry" in res.output


def test_search_text_is_literal_and_io_errors_are_project_errors(tmp_path, bundles):
    reg = open_registry(tmp_path / "registry")
    reg.publish(bundles["1.0.0"])
    assert reg.search("%") == [] and reg.search("_") == [] and len(reg.search("BOT")) == 1
    # A blob store that cannot be written: a clean RegistryError, and nothing becomes visible.
    (tmp_path / "not-a-dir").write_text("x")
    broken = open_registry(tmp_path / "registry2", blobs=str(tmp_path / "not-a-dir" / "blobs"))
    with pytest.raises(RegistryError, match="cannot publish"):
        broken.publish(bundles["1.0.0"])
    assert broken.versions() == []
    (tmp_path / "registry" / "config.json").write_text('{"schema_version": 9}')
    with pytest.raises(RegistryError, match="registry format 9 is not one this version"):
        open_registry(tmp_path / "registry")


def test_cli_keys_sign_trust_and_repair(where, tmp_path, bundles, monkeypatch):
    import shutil

    from typer.testing import CliRunner

    from cli.common import EXIT_CODES
    from cli.main import app

    monkeypatch.setenv("ADAPTERHUB_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("ADAPTERHUB_REGISTRY", where.location)
    runner = CliRunner()
    key = json.loads(runner.invoke(app, ["keys", "generate", "ci", "--json"]).stdout)
    assert os.stat(key["path"]).st_mode & 0o777 == 0o600
    assert [k["name"] for k in json.loads(runner.invoke(app, ["keys", "list", "--json"]).stdout)] == ["ci"]
    assert runner.invoke(app, ["registry", "trust", "ci", "--all-namespaces"]).exit_code == 0
    bundle = tmp_path / "b"
    shutil.copytree(bundles["1.0.0"], bundle)
    res = runner.invoke(app, ["publish", str(bundle)])
    assert res.exit_code == EXIT_CODES[ErrorKind.INVALID] and "unsigned" in res.output
    assert runner.invoke(app, ["sign", str(bundle), "--key", "ci"]).exit_code == 0
    assert runner.invoke(app, ["publish", str(bundle)]).exit_code == 0
    # An orphaned blob: `registry check` fails until `--repair` removes it. Its shard folder
    # may already exist: the signed bundle's blobs have random digests (fresh key each run).
    orphan = where.blobs / "sha256" / "00" / ("00" * 32)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"stray")
    assert runner.invoke(app, ["registry", "check"]).exit_code == 1
    res = runner.invoke(app, ["registry", "check", "--repair", "--grace", "0"])
    assert res.exit_code == 0 and "removed: 1" in res.output and not orphan.exists()
    assert runner.invoke(app, ["registry", "check"]).exit_code == 0


def test_keys_are_trusted_per_namespace(where, tmp_path, lora_dir, tiny_base, monkeypatch):
    """The attack of issue 9: a second trusted key publishing over the first key's namespace."""
    from typer.testing import CliRunner

    from cli.common import EXIT_CODES
    from cli.main import app

    monkeypatch.setenv("ADAPTERHUB_CONFIG_DIR", str(tmp_path / "cfg"))
    acme_key, globex_key, admin_key = (
        generate_key("acme-key"),
        generate_key("globex-key"),
        generate_key("admin"),
    )

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

    runner = CliRunner()
    res = runner.invoke(
        app, ["registry", "trust", "acme-key", "--namespace", "acme", "--registry", where.location]
    )
    assert res.exit_code == 0 and res.output.strip().endswith("for acme"), res.output
    reg = open_registry(where.location)
    reg.trust(globex_key.public_key, ["globex", "initech"])
    reg = open_registry(where.location)  # the scopes are remembered
    assert reg.publish(signed("acme", "1.0.0", "acme-key")).ref == "acme/geo@1.0.0"
    assert reg.publish(signed("globex", "1.0.0", "globex-key")).ref == "globex/geo@1.0.0"
    with pytest.raises(RegistryError, match="not trusted for namespace 'acme'") as e:
        reg.publish(signed("acme", "1.0.1", "globex-key"))
    assert e.value.kind is ErrorKind.FORBIDDEN and "--namespace acme" in e.value.hint
    assert reg.resolve("acme/geo").version == "1.0.0" and len(reg.versions("acme")) == 1
    res = runner.invoke(
        app, ["publish", str(tmp_path / "acme-1.0.1-globex-key"), "--registry", where.location]
    )
    assert res.exit_code == EXIT_CODES[ErrorKind.FORBIDDEN] and "Traceback" not in res.output
    # An unscoped key (how registries always stored keys) signs for every namespace.
    reg.trust(admin_key.public_key)
    assert reg.publish(signed("acme", "1.0.2", "admin")).ref == "acme/geo@1.0.2"
    # Narrowing a key's namespaces later: what it signed can no longer be pulled from this registry.
    reg.trust(acme_key.public_key, ["elsewhere"])
    with pytest.raises(RegistryError, match="not trusted for namespace 'acme'") as e:
        reg.pull("acme/geo@1.0.0", tmp_path / "pulled", vllm_check=False)
    assert e.value.kind is ErrorKind.FORBIDDEN and not (tmp_path / "pulled").exists()
    assert reg.pull("acme/geo@1.0.2", tmp_path / "ok", vllm_check=False).is_dir()
