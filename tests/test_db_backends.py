"""State by database URL: the tenant store on SQLite and PostgreSQL (every test on both), schema
versions, promotion seen by another process, and the error paths (unknown scheme, unreachable
server at start, a server stopped under use and started again)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from adapterhub_lite.errors import ErrorKind, RegistryError, ServingError, http_status
from adapterhub_lite.registry import open_registry
from adapterhub_lite.tenants.store import TenantStore, hash_key
from adapterhub_lite.tenants.view import CachedRegistry

# The tenant store's schema before schema versions (adapterhub-lite <= afda683), to prove upgrades.
LEGACY_TENANTS = """
CREATE TABLE tenants (name TEXT PRIMARY KEY, namespace TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE,
    key_hint TEXT NOT NULL, base_access INTEGER NOT NULL DEFAULT 0, requests_per_minute INTEGER,
    tokens_per_minute INTEGER, revoked INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL,
    key_rotated REAL NOT NULL);
CREATE TABLE aliases (tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    alias TEXT NOT NULL, ref TEXT NOT NULL, updated REAL NOT NULL, PRIMARY KEY (tenant, alias));
CREATE TABLE alias_history (tenant TEXT NOT NULL, alias TEXT NOT NULL, ref TEXT, at REAL NOT NULL);
"""

# The registry index as the previous release created it (adapterhub-lite afda683, index.py).
LEGACY_INDEX = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packages (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    public INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    digest TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    signatures_sha256 TEXT,
    base_name TEXT NOT NULL,
    base_fingerprint TEXT NOT NULL,
    description TEXT NOT NULL,
    license TEXT NOT NULL,
    rank INTEGER NOT NULL,
    size INTEGER NOT NULL,
    created TEXT NOT NULL,
    published_at TEXT NOT NULL,
    yanked INTEGER NOT NULL DEFAULT 0,
    yank_reason TEXT NOT NULL DEFAULT '',
    UNIQUE (namespace, name, version),
    FOREIGN KEY (namespace, name) REFERENCES packages (namespace, name)
);
CREATE TABLE IF NOT EXISTS files (
    version_id INTEGER NOT NULL REFERENCES versions (id),
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (version_id, path)
);
CREATE TABLE IF NOT EXISTS tags (
    version_id INTEGER NOT NULL REFERENCES versions (id),
    tag TEXT NOT NULL,
    PRIMARY KEY (version_id, tag)
);
CREATE TABLE IF NOT EXISTS shares (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    grantee TEXT NOT NULL,
    PRIMARY KEY (namespace, name, grantee)
);
CREATE INDEX IF NOT EXISTS versions_base ON versions (base_fingerprint);
CREATE INDEX IF NOT EXISTS files_sha ON files (sha256);
"""


@pytest.fixture
def store(db_location):
    s = TenantStore.open(db_location)
    yield s
    s.close()


def _wait_for_change(reader: TenantStore, before: int, timeout: float = 5.0) -> int:
    """PostgreSQL delivers NOTIFY asynchronously (milliseconds); SQLite's probe moves at once."""
    deadline = time.monotonic() + timeout
    while (v := reader.data_version()) == before:
        assert time.monotonic() < deadline, "the change never reached the other store"
        time.sleep(0.005)
    return v


# -- the tenant store, on both backends --------------------------------------------------------------


def test_keys_are_stored_hashed_and_authenticate(store):
    tenant, key = store.add_tenant("acme", base_access=True)
    assert tenant.namespace == "acme" and tenant.base_access
    with store.db.read() as con:
        raw = con.execute(sa.text("SELECT key_hash, key_hint FROM tenants")).one()
    assert raw[0] == hash_key(key) and key not in raw[0] and key not in raw[1]
    assert store.authenticate(key).name == "acme"
    assert store.authenticate(key + "x") is None


def test_rotate_revoke_limits_and_base_access(store):
    _, old = store.add_tenant("acme")
    new = store.rotate_key("acme")
    assert new != old
    assert store.authenticate(old) is None and store.authenticate(new).name == "acme"
    store.set_limits("acme", 10, 1000)
    store.set_base_access("acme", True)
    t = store.get("acme")
    assert (t.requests_per_minute, t.tokens_per_minute, t.base_access) == (10, 1000, True)
    store.revoke("acme")
    assert store.authenticate(new) is None and store.get("acme").revoked
    assert [t.name for t in store.list_tenants()] == ["acme"]


def test_names_follow_the_registry_grammar_and_errors_have_kinds(store):
    store.add_tenant("acme")
    with pytest.raises(ServingError, match="already exists") as e:
        store.add_tenant("acme")
    assert e.value.kind is ErrorKind.CONFLICT
    # `acme_` is not a registry namespace (names end with a letter or digit): refused as a tenant too.
    for bad in ("acme_", "Bad/Name", "a..b", "-x"):
        with pytest.raises(ServingError, match="invalid tenant name") as e:
            store.add_tenant(bad)
        assert e.value.kind is ErrorKind.INVALID
    with pytest.raises(ServingError, match="invalid namespace"):
        store.add_tenant("initech", namespace="initech_")
    with pytest.raises(ServingError, match="no tenant named") as e:
        store.rotate_key("ghost")
    assert e.value.kind is ErrorKind.NOT_FOUND
    with pytest.raises(ServingError, match="full reference"):
        store.set_alias("acme", "bot", "acme/bot")
    with pytest.raises(ServingError, match="invalid alias"):
        store.set_alias("acme", "acme/bot@1.0.0", "acme/bot@1.0.0")
    with pytest.raises(ServingError, match="positive number") as e:
        store.set_limits("acme", 0, None)
    assert e.value.kind is ErrorKind.INVALID
    with pytest.raises(ServingError, match="has no alias") as e:
        store.remove_alias("acme", "nothing")
    assert e.value.kind is ErrorKind.NOT_FOUND


def test_alias_moves_are_seen_by_another_store(store, db_location):
    store.add_tenant("acme")
    reader = TenantStore.open(db_location)
    try:
        v0 = reader.data_version()
        assert store.set_alias("acme", "bot", "acme/bot@1.0.0") is None
        v1 = _wait_for_change(reader, v0)
        assert reader.all_aliases() == {"acme": {"bot": "acme/bot@1.0.0"}}
        assert store.set_alias("acme", "bot", "acme/bot@2.0.0") == "acme/bot@1.0.0"
        assert store.set_alias("acme", "bot", "acme/bot@1.0.0") == "acme/bot@2.0.0"  # rollback
        _wait_for_change(reader, v1)
        store.remove_alias("acme", "bot")
        assert [r for _, r in reader.alias_history("acme", "bot")] == [
            "acme/bot@1.0.0",
            "acme/bot@2.0.0",
            "acme/bot@1.0.0",
            None,
        ]
        assert reader.aliases("acme") == {}
        v2 = reader.data_version()
        store.revoke("acme")  # a revoke moves the probe too: cached keys must be dropped
        _wait_for_change(reader, v2)
    finally:
        reader.close()


PROMOTE_WATCHER = textwrap.dedent(
    """
    import sys, time
    from adapterhub_lite.tenants.store import TenantStore
    store = TenantStore.open(sys.argv[1])
    seen = store.data_version()
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        v = store.data_version()
        if v != seen:
            seen = v
            ref = store.aliases("acme").get("bot")
            if ref == sys.argv[2]:
                print(f"{time.time():.6f}", flush=True)
                break
        time.sleep(0.001)
    """
)


@pytest.mark.slow
def test_promote_is_seen_by_another_process(store, db_location, backend):
    """The other process is a second server's store: it sees the move on its next probe (how soon is
    measured in benchmarks/promote_bench.py, not asserted against the clock here)."""
    store.add_tenant("acme")
    store.set_alias("acme", "bot", "acme/bot@1.0.0")
    watcher = subprocess.Popen(
        [sys.executable, "-c", PROMOTE_WATCHER, db_location, "acme/bot@2.0.0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout.readline().strip() == "ready"  # its probe's starting point is taken
        t0 = time.time()
        store.set_alias("acme", "bot", "acme/bot@2.0.0")
        line = watcher.stdout.readline()  # the watcher gives up after 30 s, printing nothing
        assert line, f"the other process never saw the promote ({backend})"
        assert float(line) >= t0, (backend, float(line) - t0)  # after the move, on the same clock
    finally:
        watcher.kill()
        watcher.wait()


# -- schema versions -------------------------------------------------------------------------------


def test_a_legacy_sqlite_store_is_upgraded_in_place(tmp_path):
    path = tmp_path / "tenants.db"
    con = sqlite3.connect(path)
    con.executescript(LEGACY_TENANTS)
    con.execute("INSERT INTO tenants VALUES ('acme','acme',?,'ahk_x...',0,NULL,NULL,0,1.0,1.0)", ("h" * 64,))
    for i, ref in enumerate(["acme/bot@1.0.0", "acme/bot@2.0.0", "acme/bot@1.0.0"]):
        con.execute(
            "INSERT INTO alias_history VALUES ('acme','bot',?,?)", (ref, 5.0 - i)
        )  # clock stepped back
    con.commit()
    con.close()
    store = TenantStore.open(path)
    assert [r for _, r in store.alias_history("acme", "bot")] == [
        "acme/bot@1.0.0",
        "acme/bot@2.0.0",
        "acme/bot@1.0.0",
    ]
    with store.db.read() as c:
        assert c.execute(sa.text("SELECT value FROM meta WHERE key='schema_version'")).scalar() == "2"
    store.set_alias("acme", "bot", "acme/bot@3.0.0")
    assert store.alias_history("acme", "bot")[-1][1] == "acme/bot@3.0.0"
    store.close()


def test_a_database_newer_than_the_code_is_refused(db_location, tmp_path, backend):
    TenantStore.open(db_location).close()
    engine = sa.create_engine(
        db_location.replace("postgresql://", "postgresql+psycopg://")
        if backend == "postgresql"
        else f"sqlite:///{db_location}"
    )
    with engine.begin() as con:
        con.execute(sa.text("UPDATE meta SET value = '99' WHERE key = 'schema_version'"))
    engine.dispose()
    with pytest.raises(ServingError, match="schema version 99, newer than") as e:
        TenantStore.open(db_location)
    assert e.value.kind is ErrorKind.INTERNAL and "upgrade adapterhub-lite" in e.value.hint


def test_a_registry_index_newer_than_the_code_is_refused(backend, tmp_path, request):
    if backend == "sqlite":
        location, index = str(tmp_path / "reg"), f"sqlite:///{tmp_path / 'reg' / 'index.sqlite'}"
        open_registry(location)
    else:
        location = request.getfixturevalue("postgres").new_database()
        index = location.replace("postgresql://", "postgresql+psycopg://")
        open_registry(location, blobs=str(tmp_path / "blobs"))
    engine = sa.create_engine(index)
    with engine.begin() as con:
        con.execute(sa.text("UPDATE meta SET value = '7' WHERE key = 'schema_version'"))
    engine.dispose()
    with pytest.raises(RegistryError, match="schema version 7, newer than"):
        open_registry(location)


@pytest.mark.slow
def test_a_registry_on_a_server_needs_blobs_once_and_remembers_them(postgres, tmp_path):
    url = postgres.new_database()
    with pytest.raises(RegistryError, match="needs a home for its blobs") as e:
        open_registry(url)
    assert e.value.kind is ErrorKind.INVALID and "--blobs" in e.value.hint
    with pytest.raises(RegistryError, match="no registry at"):
        open_registry(url, create=False)
    open_registry(url, blobs=str(tmp_path / "blobs"))
    assert open_registry(url).blobs.url == str(tmp_path / "blobs")
    with pytest.raises(RegistryError, match="stores its blobs in") as e:
        open_registry(url, blobs=str(tmp_path / "elsewhere"))
    assert e.value.kind is ErrorKind.CONFLICT


# -- error paths -----------------------------------------------------------------------------------


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_unknown_schemes_are_refused_with_the_supported_list():
    with pytest.raises(ServingError, match="unknown scheme 'mysql'") as e:
        TenantStore.open("mysql://u:pw@host/db")
    assert e.value.kind is ErrorKind.INVALID and "postgresql://" in e.value.hint and "pw" not in str(e.value)
    with pytest.raises(RegistryError, match="unknown scheme 'redis'") as e:
        open_registry("redis://localhost/0")
    assert e.value.kind is ErrorKind.INVALID and "sqlite:///" in e.value.hint


def test_an_unreachable_server_at_start_is_one_line_naming_the_url(tmp_path):
    from typer.testing import CliRunner

    from cli.common import EXIT_CODES
    from cli.main import app

    url = f"postgresql://alice:s3cret@127.0.0.1:{_closed_port()}/adapterhub"
    with pytest.raises(ServingError) as e:
        TenantStore.open(url)
    assert e.value.kind is ErrorKind.UNAVAILABLE and http_status(e.value) == 503 and e.value.retry_after
    assert "127.0.0.1" in e.value.message and "s3cret" not in str(e.value) and "\n" not in e.value.message
    assert "server is running" in e.value.hint
    runner = CliRunner()
    for args in (["tenant", "list", "--db", url], ["list", "--registry", url]):
        res = runner.invoke(app, args)
        assert res.exit_code == EXIT_CODES[ErrorKind.UNAVAILABLE], res.output
        lines = res.output.strip().splitlines()
        assert lines[0].startswith("error: ") and "alice:***@127.0.0.1" in lines[0], lines
        assert len(lines) == 2 and lines[1].startswith("  hint:") and "s3cret" not in res.output


@pytest.mark.slow
def test_a_server_stopped_under_use_is_unavailable_then_recovers(own_postgres, tmp_path, bundles_for_stop):
    """Stop the real server: every path answers UNAVAILABLE (503 + Retry-After); start it again:
    the same objects work again, without being reopened. (A server of its own: the session's is shared.)"""
    postgres = own_postgres
    tenants_url = postgres.new_database()
    registry_url = postgres.new_database()
    store = TenantStore.open(tenants_url)
    _, key = store.add_tenant("acme")
    reg = open_registry(registry_url, blobs=str(tmp_path / "blobs"))
    reg.publish(bundles_for_stop)
    version = store.data_version()
    view = CachedRegistry(reg)
    postgres.stop()
    try:
        errors = []
        for call in (
            lambda: store.authenticate(key),
            lambda: store.set_alias("acme", "bot", "acme/bot@1.0.0"),
            lambda: reg.resolve("acme/bot"),
            lambda: reg.publish(bundles_for_stop),
        ):
            with pytest.raises((ServingError, RegistryError)) as e:
                call()
            errors.append(e.value)
        deadline = time.monotonic() + 10
        while True:  # the change feed notices within its poll interval, then fails closed
            try:
                store.data_version()
            except ServingError as e:
                errors.append(e)
                break
            assert time.monotonic() < deadline, "the change feed never noticed the server was down"
            time.sleep(0.05)
        for lookup in (  # what a replica asks: a registry that cannot answer is no "does not exist"
            lambda: view.full_ref("acme/bot"),
            lambda: view.can_read("acme", "acme/bot@1.0.0"),
            lambda: view.readable("acme", None),
        ):
            with pytest.raises(RegistryError) as e:
                lookup()
            errors.append(e.value)
        for err in errors:
            assert err.kind is ErrorKind.UNAVAILABLE and http_status(err) == 503 and err.retry_after, err
    finally:
        postgres.start()
    assert store.authenticate(key).name == "acme"
    assert reg.resolve("acme/bot").version == "1.0.0"
    assert view.full_ref("acme/bot") == "acme/bot@1.0.0"  # the failures were not remembered
    deadline = time.monotonic() + 15
    while True:
        try:
            after = store.data_version()
            break
        except ServingError:
            assert time.monotonic() < deadline, "the change feed never reconnected"
            time.sleep(0.1)
    assert after != version  # it reconnected and says "reload": changes while down may be missed
    store.set_alias("acme", "bot", "acme/bot@1.0.0")
    _wait_for_change(store, after)
    store.close()


@pytest.fixture
def bundles_for_stop(lora_dir, tiny_base, tmp_path) -> Path:
    from adapterhub_lite.bundles import pack_bundle

    return pack_bundle(
        lora_dir,
        tmp_path / "b",
        namespace="acme",
        name="bot",
        version="1.0.0",
        base_dir=tiny_base,
        vllm_check=False,
    )


def test_sqlite_urls_name_the_same_files_as_paths(tmp_path):
    TenantStore.open(f"sqlite:///{tmp_path / 'tenants.db'}").add_tenant("acme")
    assert TenantStore.open(tmp_path / "tenants.db").get("acme").namespace == "acme"
    for location in (f"sqlite:///{tmp_path / 'reg'}", f"sqlite:///{tmp_path / 'reg' / 'index.sqlite'}"):
        reg = open_registry(location)
        assert reg.location == tmp_path / "reg" and (tmp_path / "reg" / "index.sqlite").is_file()
        assert reg.blobs.url == str(tmp_path / "reg" / "blobs")


def test_a_registry_made_by_the_previous_release_opens_unchanged(tmp_path, bundles_for_stop):
    location = tmp_path / "reg"
    location.mkdir()
    con = sqlite3.connect(location / "index.sqlite")
    con.executescript(LEGACY_INDEX)
    con.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
    con.commit()
    con.close()
    (location / "config.json").write_text('{"schema_version": 1, "blobs": null, "trusted_keys": []}')
    reg = open_registry(location)
    p = reg.publish(bundles_for_stop)
    reg.share("acme/bot", "globex")
    assert reg.resolve("acme/bot").digest == p.digest and reg.can_read("globex", "acme/bot@1.0.0")
    assert reg.pull("acme/bot", tmp_path / "pulled", vllm_check=False).is_dir()
    assert reg.check(deep=True).ok and (location / "blobs" / "sha256").is_dir()
    assert sorted(p.name for p in location.iterdir()) == ["blobs", "config.json", "index.sqlite"] + [
        n for n in ("index.sqlite-shm", "index.sqlite-wal") if (location / n).exists()
    ]


def _gateway(store: TenantStore):
    """The tenancy middleware on `store`, in front of an ASGI app that stands in for vLLM's API server
    (only the tenancy layer's answer is under test; tests/test_cluster.py runs an outage through real
    vLLM replicas); returns the middleware and a list whose one item counts the requests let through."""
    import json

    from prometheus_client import CollectorRegistry

    from adapterhub_lite.serving.config import ServingConfig
    from adapterhub_lite.serving.gateway.metrics import ServingMetrics
    from adapterhub_lite.serving.gateway.middleware import TenancyMiddleware

    reached = [0]

    async def vllm(scope, receive, send):
        reached[0] += 1
        body = json.dumps({"choices": [{"text": "ok"}], "usage": {"prompt_tokens": 1}})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body.encode()})

    mw = TenancyMiddleware(
        vllm,
        config=ServingConfig(admin_key="admin", warmup=False, served_name="base"),
        store=store,
        metrics=ServingMetrics(CollectorRegistry()),
    )
    return mw, reached


@pytest.mark.slow
def test_a_tenant_already_in_memory_gets_503_while_the_database_is_down(own_postgres, tmp_path):
    """The tenancy layer on a real PostgreSQL server of this test's own: a tenant served (so in memory)
    gets only 503s with Retry-After while the server is down, from the moment its stop has returned
    (plus the change feed's notice: the server's goodbye wakes it at once, its next probe at worst one
    poll later), and is served again after the restart."""
    import asyncio

    from gateway_client import asker

    from adapterhub_lite.db.changes import POLL_S

    store = TenantStore.open(own_postgres.new_database())
    _, key = store.add_tenant("acme", base_access=True)
    mw, reached = _gateway(store)
    ask = asker(mw, key)
    notice_s = 2 * POLL_S  # the goodbye missed, the next probe finds it; doubled for a loaded machine

    async def run() -> tuple[list[tuple[float, int, dict]], float]:
        assert (await ask())[0] == 200  # the tenant is in memory now
        own_postgres.stop()
        try:
            stopped = time.monotonic()
            down: list[tuple[float, int, dict]] = []
            while time.monotonic() - stopped < notice_s + 3:  # down for three seconds past the notice
                sent = time.monotonic() - stopped
                down.append((sent, *await ask()))
                await asyncio.sleep(0.05)
        finally:
            own_postgres.start()
        restarted = time.monotonic()
        while (answer := await ask())[0] != 200:
            assert time.monotonic() - restarted < 30, f"not served 30 s after the restart: {answer}"
            await asyncio.sleep(0.2)
        if mw._sweeper is not None:
            mw._sweeper.cancel()
        return down, time.monotonic() - restarted

    down, recovered = asyncio.run(run())
    assert reached[0] >= 2  # the 200s came from "vLLM"
    assert {status for _, status, _ in down} <= {200, 503}
    settled = [(sent, status, headers) for sent, status, headers in down if sent >= notice_s]
    assert len(settled) >= 10 and all(status == 503 for _, status, _ in settled), [
        (round(sent, 2), status) for sent, status, _ in down
    ]
    assert all(int(headers[b"retry-after"]) >= 1 for _, _, headers in settled)
    print(f"{len(down)} asked while down, {sum(s == 200 for _, s, _ in down)} answered 200 within "
          f"{notice_s} s of the stop; served again {recovered:.1f} s after the restart")


@pytest.mark.slow
def test_a_silent_partition_answers_503_within_the_silence_bound_then_recovers(own_postgres, monkeypatch):
    """PostgreSQL behind a proxy that goes silent (tests/tcp_proxy.py: connections stay open, nothing is
    forwarded, no TCP timeout fires): a tenant in memory is still answered at once (no request waits on
    the database), is answered 503 once the change feed's probe has gone unanswered for
    `ADAPTERHUB_DB_SILENCE_SECONDS` (2 s here), only 503 while the partition lasts, and is served
    again once the proxy forwards."""
    import asyncio

    from gateway_client import asker
    from tcp_proxy import SilentProxy

    from adapterhub_lite.db.changes import POLL_S
    from adapterhub_lite.db.engine import PG_CONNECT_ARGS

    silence = 2.0
    monkeypatch.setenv("ADAPTERHUB_DB_SILENCE_SECONDS", str(silence))
    url = own_postgres.new_database()
    with SilentProxy(own_postgres.port) as proxy:
        store = TenantStore.open(url.replace(f":{own_postgres.port}/", f":{proxy.port}/"))
        _, key = store.add_tenant("acme", base_access=True)
        mw, reached = _gateway(store)
        ask = asker(mw, key)
        # The probe goes out at most one poll after the partition starts and is given up `silence` s
        # later; two more seconds for a loaded machine (CI once missed a tighter bound under load).
        bound = POLL_S + silence + 2.0

        async def timed() -> tuple[int, float]:
            sent = time.monotonic()
            status, _ = await ask()
            return status, time.monotonic() - sent

        async def run() -> tuple[list[tuple[float, int, float]], float]:
            assert (await ask())[0] == 200  # the tenant is in memory now
            proxy.blackhole()
            try:
                cut = time.monotonic()
                seen: list[tuple[float, int, float]] = []
                while time.monotonic() - cut < bound + 3:
                    sent = time.monotonic() - cut
                    seen.append((sent, *await timed()))
                    await asyncio.sleep(0.05)
            finally:
                proxy.forward()
            healed = time.monotonic()
            while (answer := await ask())[0] != 200:
                # The listener retries every 5 s at most (its back-off's cap), each try held at most
                # `connect_timeout`; five seconds more for a loaded machine.
                limit = 5 + PG_CONNECT_ARGS["connect_timeout"] + 5
                assert time.monotonic() - healed < limit, f"not served {limit} s after it healed: {answer}"
                await asyncio.sleep(0.2)
            if mw._sweeper is not None:
                mw._sweeper.cancel()
            return seen, time.monotonic() - healed

        seen, recovered = asyncio.run(run())
    statuses = [(round(sent, 2), status) for sent, status, _ in seen]
    assert {status for _, status, _ in seen} <= {200, 503}, statuses
    # never waits on the silent database: a request that did would take at least `silence` s
    assert max(took for _, _, took in seen) < silence / 2, statuses
    settled = [status for sent, status, _ in seen if sent >= bound]
    assert len(settled) >= 10 and set(settled) == {503}, statuses
    first_503 = min(sent for sent, status, _ in seen if status == 503)
    assert first_503 >= silence, statuses  # given its `silence` seconds: not a fluke of something else
    assert reached[0] >= 2
    print(f"first 503 {first_503:.2f} s into the partition (bound {bound} s); served again "
          f"{recovered:.1f} s after it healed")
