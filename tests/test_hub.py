"""The hub over real HTTP: health, tokens, scopes, publish, pull with Range and resume, search, yank, share,
the remote client and the CLI against a hub URL."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import httpx
import pytest
from hub_fixtures import running_hub, with_loss_history
from typer.testing import CliRunner

from adapterhub_lite.bundles import pack_bundle, verify_bundle
from adapterhub_lite.errors import ErrorKind, RegistryError
from cli.main import app as cli_app


@pytest.fixture(scope="module")
def bundles(trained_dir, lora_dir, tiny_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub-bundles")
    rich = with_loss_history(trained_dir, root / "rich-adapter")
    out = {}
    for v in ("1.0.0", "1.1.0"):
        out[v] = pack_bundle(
            rich,
            root / f"geo-{v}.tar",
            namespace="acme",
            name="geo",
            version=v,
            base_dir=tiny_base,
            description="capitals of the world",
            tags=["geo"],
            archive=True,
            vllm_check=False,
        )
    out["globex"] = pack_bundle(
        lora_dir,
        root / "globex.tar",
        namespace="globex",
        name="bot",
        version="1.0.0",
        base_dir=tiny_base,
        archive=True,
        vllm_check=False,
    )
    out["dir"] = pack_bundle(
        lora_dir,
        root / "dirbundle",
        namespace="acme",
        name="dirpub",
        version="0.1.0",
        base_dir=tiny_base,
        vllm_check=False,
    )
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory, bundles):
    with running_hub(tmp_path_factory.mktemp("hub") / "registry") as h:
        acme = h.client("acme", "publish")
        acme.publish(bundles["1.0.0"])
        acme.publish(bundles["1.1.0"])
        h.client("globex", "publish").publish(bundles["globex"])
        yield h


def test_health_and_whoami(hub):
    assert hub.get("/health").json() == {"status": "ok"}
    assert hub.get("/api/v1/whoami").json() == {"namespace": None, "scope": None}
    r = hub.get("/api/v1/whoami", token=hub.token("acme", "read"))
    assert r.json() == {"namespace": "acme", "scope": "read"}


def test_token_cli_shows_once_stores_hash_lists_and_revokes(tmp_path):
    reg = tmp_path / "reg"
    runner = CliRunner()
    r = runner.invoke(cli_app, ["hub", "token", "acme", "--scope", "publish", "--registry", str(reg)])
    assert r.exit_code == 0, r.output
    token = r.output.strip().splitlines()[-1]
    assert token.startswith("ahub_") and len(token) > 40
    db = reg / "hub" / "tokens.sqlite"
    assert (db.stat().st_mode & 0o777) == 0o600
    assert token.encode() not in db.read_bytes()
    secret = token.split("_", 2)[2]
    stored = sqlite3.connect(db).execute("SELECT hash FROM hub_tokens").fetchone()[0]
    assert stored == hashlib.sha256(secret.encode()).hexdigest()
    listed = runner.invoke(cli_app, ["hub", "tokens", "--registry", str(reg), "--json"])
    rows = json.loads(listed.output)
    assert [(t["namespace"], t["scope"], t["revoked"]) for t in rows] == [("acme", "publish", False)]
    assert token not in listed.output
    assert runner.invoke(cli_app, ["hub", "revoke", rows[0]["id"], "--registry", str(reg)]).exit_code == 0
    rows = json.loads(runner.invoke(cli_app, ["hub", "tokens", "--registry", str(reg), "--json"]).output)
    assert rows[0]["revoked"] is True
    bad = runner.invoke(cli_app, ["hub", "token", "acme", "--scope", "root", "--registry", str(reg)])
    assert bad.exit_code == 65 and "unknown scope" in bad.output


def test_token_store_on_every_database_backend(db_location, tmp_path):
    """The token store on SQLite and on a real PostgreSQL (the `backend` fixture): two hubs over one
    database see each other's tokens and revocations, and a hub app authenticates through it."""
    from starlette.testclient import TestClient

    from adapterhub_lite.hub import HubConfig, TokenStore, create_app
    from adapterhub_lite.hub.tokens import HubError
    from adapterhub_lite.registry import open_registry

    first, second = TokenStore(db_location), TokenStore(db_location)  # two replicas, one database
    token, info = first.create("acme", "publish", note="ci")
    assert second.check(token) == info
    assert [t.id for t in second.list()] == [info.id]
    for bad in (token[:-1] + ("A" if token[-1] != "A" else "B"), token.replace(info.id, "0" * 12), "x"):
        with pytest.raises(HubError) as e:
            second.check(bad)
        assert e.value.kind == ErrorKind.UNAUTHENTICATED
    assert second.revoke(info.id).revoked
    with pytest.raises(HubError) as e:
        first.check(token)
    assert e.value.kind == ErrorKind.UNAUTHENTICATED
    with pytest.raises(HubError) as e:
        first.revoke("nosuchid")
    assert e.value.kind == ErrorKind.NOT_FOUND

    reader, _ = first.create("acme", "read")
    config = HubConfig(state_dir=tmp_path / "state", tokens_db=db_location)
    with TestClient(create_app(open_registry(tmp_path / "reg"), config)) as client:
        r = client.get("/api/v1/whoami", headers={"authorization": f"Bearer {reader}"})
        assert r.json() == {"namespace": "acme", "scope": "read"}
        assert client.get("/api/v1/whoami", headers={"authorization": f"Bearer {token}"}).status_code == 401
    assert not (tmp_path / "state" / "tokens.sqlite").exists()
    first.close()
    second.close()


def test_token_store_keeps_tokens_of_a_store_made_before_the_database_layer(tmp_path):
    from adapterhub_lite.hub import TokenStore

    path = tmp_path / "tokens.sqlite"
    secret = "s3cret"
    con = sqlite3.connect(path)
    con.execute(
        "CREATE TABLE tokens (id TEXT PRIMARY KEY, namespace TEXT NOT NULL, scope TEXT NOT NULL,"
        " hash TEXT NOT NULL, created TEXT NOT NULL, revoked INTEGER NOT NULL DEFAULT 0,"
        " note TEXT NOT NULL DEFAULT '')"
    )
    con.execute(
        "INSERT INTO tokens VALUES ('abc123', 'acme', 'read', ?, '2026-01-01T00:00:00Z', 0, '')",
        (hashlib.sha256(secret.encode()).hexdigest(),),
    )
    con.commit()
    con.close()
    store = TokenStore(path)
    assert store.check(f"ahub_abc123_{secret}").namespace == "acme"
    assert [t.id for t in TokenStore(path).list()] == ["abc123"]
    # migrated by the one schema mechanism (db/schema.py), under the tokens' own version key
    con = sqlite3.connect(path)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    version = con.execute("SELECT value FROM meta WHERE key = 'hub_tokens_schema_version'").fetchone()
    con.close()
    assert "tokens" not in tables and version == ("2",)


def test_private_adapters_are_404_exactly_like_missing_ones(hub):
    missing = hub.get("/api/v1/resolve", params={"ref": "acme/nothing@1.0.0"})
    private = hub.get("/api/v1/resolve", params={"ref": "acme/geo@1.0.0"})
    assert missing.status_code == private.status_code == 404
    assert missing.json()["error"]["kind"] == private.json()["error"]["kind"] == "not_found"
    # Same message shape: only the reference the caller typed differs.
    assert private.json()["error"]["message"] == "no acme/geo@1.0.0 on this hub"
    assert missing.json()["error"]["message"] == "no acme/nothing@1.0.0 on this hub"
    other = hub.get(
        "/api/v1/file/acme/geo/1.0.0/adapter_model.safetensors", token=hub.token("globex", "read")
    )
    assert other.status_code == 404
    assert hub.client().search("geo") == []
    assert [p.ref for p in hub.client("acme").search("geo")] == ["acme/geo@1.1.0"]


def test_scopes_sharing_and_public(hub):
    acme, globex = hub.client("acme", "publish"), hub.client("globex", "read")
    with pytest.raises(RegistryError) as e:
        globex.resolve("acme/geo")
    assert e.value.kind == ErrorKind.NOT_FOUND
    acme.share("acme/geo", "globex")
    assert globex.resolve("acme/geo").ref == "acme/geo@1.1.0"
    assert globex.can_read("globex", "acme/geo@1.0.0")
    assert hub.client().versions("acme") == []  # still private for anonymous callers
    acme.share("acme/geo", "globex", revoke=True)
    with pytest.raises(RegistryError):
        globex.resolve("acme/geo")
    # A read token changes nothing; a publish token changes only its namespace.
    with pytest.raises(RegistryError) as e:
        hub.client("acme", "read").yank("acme/geo@1.0.0")
    assert e.value.kind == ErrorKind.FORBIDDEN
    with pytest.raises(RegistryError) as e:
        hub.client("globex", "publish").yank("acme/geo@1.0.0")  # cannot even see it: 404, not 403
    assert e.value.kind == ErrorKind.NOT_FOUND
    hub.client("globex", "publish").set_public("globex/bot")
    with pytest.raises(RegistryError) as e:
        acme.yank("globex/bot@1.0.0")  # readable (public), not theirs: 403
    assert e.value.kind == ErrorKind.FORBIDDEN
    assert [p.ref for p in hub.client().search("")] == ["globex/bot@1.0.0"]
    admin = hub.client("ops", "admin")
    assert {p.ref for p in admin.versions()} >= {"acme/geo@1.0.0", "acme/geo@1.1.0", "globex/bot@1.0.0"}


def test_yank_flags_and_moves_the_default(hub):
    acme = hub.client("acme", "publish")
    p = acme.yank("acme/geo@1.1.0", reason="bad capitals")
    assert p.yanked and p.yank_reason == "bad capitals"
    assert acme.resolve("acme/geo").ref == "acme/geo@1.0.0"
    assert [v.yanked for v in acme.versions("acme") if v.name == "geo"] == [False, True]
    acme.yank("acme/geo@1.1.0", undo=True)
    assert acme.resolve("acme/geo").ref == "acme/geo@1.1.0"


def test_pull_checks_every_file_and_resumes_with_range(hub, bundles, tmp_path):
    acme = hub.client("acme", "read")
    statuses: list[int] = []
    connect = acme._connection

    def recording_connection():
        conn = connect()
        getresponse = conn.getresponse

        def recorded():
            r = getresponse()
            statuses.append(r.status)
            return r

        conn.getresponse = recorded
        return conn

    acme._connection = recording_connection
    out = acme.pull("acme/geo@1.0.0", tmp_path / "geo")
    assert verify_bundle(out).digest == acme.resolve("acme/geo@1.0.0").digest
    # An interrupted download: the partial folder holds half of the weights. The next pull asks for the
    # rest with a Range request (206) and the result verifies.
    p = acme.resolve("acme/geo@1.0.0")
    partial = tmp_path / f".again.{p.digest.removeprefix('sha256:')[:16]}.partial"
    partial.mkdir()
    weights = (out / "adapter_model.safetensors").read_bytes()
    (partial / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    statuses.clear()
    again = acme.pull("acme/geo@1.0.0", tmp_path / "again")
    assert 206 in statuses
    assert (again / "adapter_model.safetensors").read_bytes() == weights
    assert not partial.exists()
    # The Range answer itself, byte for byte.
    r = hub.get(
        "/api/v1/file/acme/geo/1.0.0/adapter_model.safetensors",
        token=hub.token("acme", "read"),
        headers={"range": "bytes=100-199"},
    )
    assert r.status_code == 206 and r.content == weights[100:200]


def test_pull_refuses_bytes_that_do_not_match_the_listing(hub, tmp_path):
    acme = hub.client("acme", "read")
    p = acme.resolve("acme/geo@1.0.0")
    partial = tmp_path / f".bad.{p.digest.removeprefix('sha256:')[:16]}.partial"
    partial.mkdir()
    size = acme._get("/api/v1/files", ref=p.ref)["files"]
    weights = next(f for f in size if f["path"] == "adapter_model.safetensors")
    (partial / "adapter_model.safetensors").write_bytes(b"\xff" * (weights["size"] // 2))  # wrong prefix
    with pytest.raises(RegistryError, match="do not match the hub's sha256"):
        acme.pull(p.ref, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert acme.pull(p.ref, tmp_path / "bad").is_dir()  # the bad part was dropped; a new pull works


def test_publish_a_directory_and_idempotence(hub, bundles):
    acme = hub.client("acme", "publish")
    first = acme.publish(bundles["dir"])
    again = acme.publish(bundles["dir"])
    assert first.ref == again.ref == "acme/dirpub@0.1.0" and first.digest == again.digest
    assert hub.uploads_left() == []


def test_errors_are_json_with_the_cli_message(hub, bundles):
    r = httpx.put(
        hub.url + "/api/v1/publish",
        content=Path(bundles["1.0.0"]).read_bytes(),
        headers={"authorization": "Bearer ahub_nothing_here"},
    )
    assert r.status_code == 401
    assert r.json()["error"] == {
        "kind": "unauthenticated",
        "message": "invalid or revoked token",
        "hint": "create one with `adapterhub hub token NAMESPACE`",
    }
    r = hub.get("/api/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["kind"] == "not_found"


def test_cli_commands_take_a_hub_url(hub, bundles, tmp_path, monkeypatch):
    runner = CliRunner()
    monkeypatch.setenv("ADAPTERHUB_TOKEN", hub.token("acme", "publish"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    out = runner.invoke(cli_app, ["publish", str(bundles["1.0.0"]), "--registry", hub.url, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["ref"] == "acme/geo@1.0.0"
    pulled = runner.invoke(
        cli_app, ["pull", "acme/geo@1.0.0", "-o", str(tmp_path / "g"), "--registry", hub.url]
    )
    assert pulled.exit_code == 0, pulled.output
    assert verify_bundle(tmp_path / "g").ref == "acme/geo@1.0.0"
    shown = runner.invoke(cli_app, ["show", "acme/geo", "--registry", hub.url, "--json"])
    assert json.loads(shown.output)["ref"] == "acme/geo@1.1.0"
    monkeypatch.setenv("ADAPTERHUB_TOKEN", hub.token("globex", "read"))
    missing = runner.invoke(
        cli_app, ["pull", "acme/geo@1.0.0", "-o", str(tmp_path / "x"), "--registry", hub.url]
    )
    assert missing.exit_code == 66 and "no acme/geo@1.0.0 on this hub" in missing.output
    # `adapterhub login` stores the token in a 0600 file that later commands use.
    monkeypatch.delenv("ADAPTERHUB_TOKEN")
    login = runner.invoke(cli_app, ["login", "--token", hub.token("acme", "read"), "--hub", hub.url])
    assert login.exit_code == 0, login.output
    stored = tmp_path / "cfg" / "adapterhub" / "hub-tokens.json"
    assert (stored.stat().st_mode & 0o777) == 0o600
    listed = runner.invoke(cli_app, ["list", "acme", "--registry", hub.url, "--json"])
    assert "acme/geo@1.0.0" in {p["ref"] for p in json.loads(listed.output)}
    assert os.environ.get("ADAPTERHUB_TOKEN") is None


def test_hub_with_trusted_keys_refuses_unsigned_and_shows_the_signer(tmp_path, lora_dir, tiny_base):
    from adapterhub_lite.bundles.signing import generate_key
    from adapterhub_lite.registry import open_registry

    key = generate_key("hubkey", tmp_path / "keys")
    open_registry(tmp_path / "registry").trust(key.public_key)
    unsigned = pack_bundle(
        lora_dir,
        tmp_path / "u.tar",
        namespace="acme",
        name="sig",
        version="1.0.0",
        base_dir=tiny_base,
        archive=True,
        vllm_check=False,
    )
    signed = pack_bundle(
        lora_dir,
        tmp_path / "s.tar",
        namespace="acme",
        name="sig",
        version="1.0.0",
        base_dir=tiny_base,
        archive=True,
        vllm_check=False,
        signing_key=key.path,
    )
    with running_hub(tmp_path / "registry") as h:
        acme = h.client("acme", "publish")
        with pytest.raises(RegistryError, match="unsigned") as e:
            acme.publish(unsigned)
        assert e.value.kind == ErrorKind.INVALID and h.uploads_left() == []
        assert acme.publish(signed).signed
        acme.set_public("acme/sig")
        page = h.get("/acme/sig").text
        assert key.key_id in page and "trusted by this hub" in page


@pytest.mark.slow  # a fresh Python process importing the stack: 5-20 s here
def test_hub_serve_command_answers_health(tmp_path):
    import subprocess
    import sys
    import time

    from hub_fixtures import free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from cli.main import app; app()",
            "hub",
            "serve",
            "--registry",
            str(tmp_path / "reg"),
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json() == {"status": "ok"}:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("`adapterhub hub serve` did not answer /health within 60 s")
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_search_pages_and_sees_changes_made_behind_the_hubs_back(tmp_path, bundles, monkeypatch):
    import time

    from adapterhub_lite.registry import open_registry
    from adapterhub_lite.registry import remote as remote_mod

    registry_dir = tmp_path / "registry"
    with running_hub(registry_dir) as h:
        h.client("acme", "publish").publish(bundles["1.0.0"])
        h.client("globex", "publish").publish(bundles["globex"])
        admin = h.token("ops", "admin")
        first = h.get("/api/v1/search", token=admin, params={"q": "", "limit": 1})
        second = h.get("/api/v1/search", token=admin, params={"q": "", "limit": 1, "offset": 1})
        assert first.headers["x-total-count"] == second.headers["x-total-count"] == "2"
        assert [d["ref"] for d in first.json() + second.json()] == ["acme/geo@1.0.0", "globex/bot@1.0.0"]
        monkeypatch.setattr(remote_mod, "_PAGE", 1)  # the client follows every page
        assert [p.ref for p in h.client("ops", "admin").search("")] == ["acme/geo@1.0.0", "globex/bot@1.0.0"]
        for bad in ("0", "501", "-1", "x"):
            r = h.get("/api/v1/search", params={"q": "", "limit": bad})
            assert r.status_code == 422 and "limit" in r.json()["error"]["message"]  # INVALID
        assert h.get("/api/v1/search", params={"q": "bot"}).json() == []  # private so far
        # Another process makes it public: the next searches see it (no hub call involved).
        open_registry(registry_dir).set_public("globex/bot")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if [d["ref"] for d in h.get("/api/v1/search", params={"q": "bot"}).json()] == [
                "globex/bot@1.0.0"
            ]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the public adapter never showed in anonymous search")


def test_catalog_matches_within_one_adapter_only():
    from adapterhub_lite.hub.catalog import Catalog
    from adapterhub_lite.registry.records import Published

    def row(ns: str, name: str, desc: str, tags: tuple[str, ...], public: bool = True) -> Published:
        return Published(
            ns,
            name,
            "1.0.0",
            f"sha256:{ns}{name}",
            "b",
            "fp",
            False,
            public,
            1,
            8,
            "mit",
            desc,
            "",
            "",
            False,
            tags,
        )

    rows = [row("a", "xy", "geo geo geo", ("geo",)), row("b", "zy", "Math", ("math",), public=False)]
    cat = Catalog(lambda: rows)
    assert [p.name for p in cat.search("geo")] == ["xy"]  # three hits in one adapter: listed once
    assert [p.name for p in cat.search("math")] == ["zy"]  # case-insensitive
    assert cat.search("math", public_only=True) == []
    assert [p.name for p in cat.search("y")] == ["xy", "zy"]
    assert cat.search("geo\nb/zy") == cat.search("math\x00b") == []  # never across fields or adapters
    assert [p.name for p in cat.search("", tag="math")] == ["zy"]
    assert [p.name for p in cat.search("a/", tag="geo")] == ["xy"]
    assert cat.search("a/", tag="math") == []
    assert cat.search("", base="other") == []


def test_publish_records_the_bases_it_checked_against(tmp_path, bundles, tiny_base, other_base):
    from adapterhub_lite.base import fingerprint
    from adapterhub_lite.registry import open_registry

    fp = fingerprint(tiny_base)
    reg = open_registry(tmp_path / "local")
    assert reg.publish(bundles["1.0.0"], base_dir=tiny_base).checked_bases == (fp,)
    assert reg.publish(bundles["globex"]).checked_bases == ()  # no base known: nothing checked
    with pytest.raises(RegistryError) as e:
        reg.publish(bundles["1.1.0"], base_dir=other_base)
    assert e.value.kind == ErrorKind.INVALID and "not on this base" in e.value.message
    with pytest.raises(RegistryError):
        reg.resolve("acme/geo@1.1.0")  # nothing visible
    runner = CliRunner()
    shown = runner.invoke(
        cli_app, ["show", "acme/geo@1.0.0", "--registry", str(tmp_path / "local"), "--json"]
    )
    assert json.loads(shown.output)["checked_bases"] == [fp]
    text = runner.invoke(cli_app, ["show", "globex/bot@1.0.0", "--registry", str(tmp_path / "local")]).output
    assert "against no base at publish" in text

    # A hub checks publishes for the bases it serves and says so in the API and on the page.
    with running_hub(tmp_path / "hubreg", bases={fp: tiny_base}) as h:
        p = h.client("acme", "publish").publish(bundles["1.0.0"])
        assert p.checked_bases == (fp,)
        h.client("acme", "publish").set_public("acme/geo")
        assert h.get("/api/v1/resolve", params={"ref": "acme/geo@1.0.0"}).json()["checked_bases"] == [fp]
        page = h.get("/acme/geo").text
        assert f"against base <code>{fp}</code>" in page


def test_an_index_from_before_checked_bases_is_upgraded(tmp_path, bundles):
    from adapterhub_lite.registry import open_registry

    open_registry(tmp_path / "reg").publish(bundles["globex"])
    index = next((tmp_path / "reg").rglob("index.sqlite"))
    con = sqlite3.connect(index)
    con.execute("ALTER TABLE versions DROP COLUMN checked_bases")
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    assert open_registry(tmp_path / "reg").resolve("globex/bot@1.0.0").checked_bases == ()
    con = sqlite3.connect(index)
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
    con.close()


def _folder_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def test_serving_copies_stay_within_their_bound_and_are_let_go_after_each_response(tmp_path, bundles):
    """The hub's serving copies are the one bundle cache (registry/cache.py): bounded, least recently used
    first, and a copy is leased only while a response reads it."""
    with running_hub(tmp_path / "registry") as h:
        hub = h.app.state.hub
        h.client("acme", "publish").publish(bundles["1.0.0"])
        one = _folder_bytes(h.state_dir / "bundles")
        assert one > 0, "a publish keeps its verified upload as the serving copy"
        hub.cache.max_bytes = one + one // 2  # room for one copy, not two
        h.client("acme", "publish").publish(bundles["1.1.0"])
        h.client("globex", "publish").publish(bundles["globex"])
        reader = h.client("globex", "read")
        acme = h.client("acme", "read")
        for client, ref in [(acme, "acme/geo@1.0.0"), (reader, "globex/bot@1.0.0"), (acme, "acme/geo@1.1.0")]:
            out = client.pull(ref, tmp_path / "pulled" / ref.replace("/", "_"))
            assert verify_bundle(out).digest == client.resolve(ref).digest
            assert hub.cache.leased() == set(), "a response let go of its copy once sent"
            assert _folder_bytes(h.state_dir / "bundles") <= hub.cache.max_bytes
        assert (
            h.get(
                "/api/v1/manifest", params={"ref": "acme/geo@1.0.0"}, token=h.token("acme", "read")
            ).status_code
            == 200
        )
        assert hub.cache.leased() == set()
