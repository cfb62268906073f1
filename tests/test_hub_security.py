"""The hub as an attacker meets it (issue 20): one test per hole that was found, each against a real hub
on loopback, speaking raw HTTP where a client library would hide the attack."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from hub_fixtures import running_hub, served_hub

from adapterhub_lite.bundles import pack_bundle
from adapterhub_lite.errors import ErrorKind, RegistryError

ATTACKER = "127.0.0.2"  # another loopback address: the attacker's connections are not the test's own


@pytest.fixture(scope="module")
def packs(lora_dir, tiny_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub-sec")

    def pack(ns: str, name: str, version: str = "1.0.0") -> Path:
        return pack_bundle(
            lora_dir,
            root / f"{ns}-{name}-{version}.tar",
            namespace=ns,
            name=name,
            version=version,
            base_dir=tiny_base,
            archive=True,
            vllm_check=False,
        )

    out = {"geo": pack("acme", "geo"), "bot": pack("globex", "bot"), "late": pack("acme", "late")}
    for i in range(12):
        out[f"hidden{i}"] = pack("initech", f"hidden{i}")
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory, packs):
    with running_hub(tmp_path_factory.mktemp("hub-sec") / "registry", max_upload=4 * 1024 * 1024) as h:
        h.client("acme", "publish").publish(packs["geo"])  # private
        globex = h.client("globex", "publish")
        globex.publish(packs["bot"])
        globex.set_public("globex/bot")
        yield h


def _address(hub) -> tuple[str, int]:
    host, port = hub.url.removeprefix("http://").split(":")
    return host, int(port)


def _connect(hub, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(_address(hub))
    return s


def _head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: hub", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _answer(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP answer read from `s`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _closed_by_peer(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# ---------------------------------------------------------------------------------------------- item 1
def test_silent_and_slow_clients_cannot_turn_the_hub_off(tmp_path):
    """300 silent sockets from one address, and a client that sends its headers one byte at a time:
    everyone else is still answered at once, and the server closes the silent ones itself."""
    from adapterhub_lite.hub import Limits

    limits = Limits(header_timeout_s=2.0, per_client=8, max_connections=256)
    with running_hub(tmp_path / "registry", limits=limits) as h:
        silent = []
        for _ in range(300):
            try:
                silent.append(_connect(h, ATTACKER))
            except OSError:
                break
        assert len(silent) == 300  # the kernel accepted them all: the hub must refuse them itself
        started = time.monotonic()
        r = h.get("/health")
        assert r.status_code == 200 and time.monotonic() - started < 2.0
        # Over the per-client cap: closed on arrival.
        assert _closed_by_peer(silent[-1], within=1.0)
        # Within the cap but silent: closed by the header deadline (2 s), not left to hold a slot.
        assert _closed_by_peer(silent[0], within=4.0)
        slow = _connect(h, ATTACKER)
        slow.sendall(b"GET /health HTTP/1.1\r\n")
        t0 = time.monotonic()
        closed = False
        while time.monotonic() - t0 < 5.0:  # a header line every 0.3 s: never complete
            try:
                slow.sendall(b"x-slow: 1\r\n")
            except OSError:
                closed = True
                break
            if _closed_by_peer(slow, within=0.3):
                closed = True
                break
        assert closed and time.monotonic() - t0 < 4.0
        for s in silent:
            s.close()
        slow.close()


@pytest.mark.slow
def test_hub_serve_as_shipped_stays_up_under_300_silent_sockets(tmp_path):
    """`adapterhub hub serve` with its default limits (as an operator runs it): 300 silent sockets from
    one address do not take /health away, and a silent socket is closed within the header deadline."""
    with served_hub(tmp_path / "registry") as (url, _):
        host, port = url.removeprefix("http://").split(":")
        silent = []
        for _ in range(300):
            s = socket.socket()
            s.settimeout(10)
            s.bind((ATTACKER, 0))
            s.connect((host, int(port)))
            silent.append(s)
        r = httpx.get(url + "/health", timeout=10)
        assert r.status_code == 200, r.text
        assert _closed_by_peer(silent[0], within=10.0 + 5.0)  # the default header deadline is 10 s
        for s in silent:
            s.close()


def test_request_headers_are_bounded(hub):
    s = _connect(hub)
    s.sendall(_head("GET", "/health", {"x-big": "a" * (256 * 1024)}))
    try:
        status, _, _ = _answer(s)
        assert status in (400, 431)
    except (ConnectionError, ConnectionResetError, BrokenPipeError):
        pass  # refused by closing: also bounded
    s.close()


# ---------------------------------------------------------------------------------------------- item 2
def test_a_body_is_refused_before_it_is_read(hub):
    """Anonymous: 401 before the body; with a token: 413 on Content-Length, 413 at the limit."""
    big = 300 * 1024 * 1024
    for path in ("/api/v1/yank", "/api/v1/share"):
        s = _connect(hub)
        s.sendall(_head("POST", path, {"content-length": str(big), "content-type": "application/json"}))
        s.sendall(b"[" * 65536)  # a little of the 300 MiB; the answer must not wait for the rest
        status, headers, body = _answer(s)
        assert status == 401 and json.loads(body)["error"]["kind"] == "unauthenticated"
        assert headers["x-content-type-options"] == "nosniff"
        s.close()
    token = hub.token("acme", "publish")
    s = _connect(hub)
    s.sendall(_head("POST", "/api/v1/yank", {"content-length": str(big), "authorization": f"Bearer {token}"}))
    status, _, body = _answer(s)
    assert status == 413 and "64 KiB" in json.loads(body)["error"]["message"]
    s.close()
    # No Content-Length (chunked): the hub stops reading at the limit.
    s = _connect(hub)
    s.sendall(
        _head("POST", "/api/v1/share", {"transfer-encoding": "chunked", "authorization": f"Bearer {token}"})
    )
    chunk = b"x" * 16384
    try:
        for _ in range(64):  # up to 1 MiB, far past the 64 KiB limit
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except OSError:
        pass  # the hub answered and closed: read its answer
    status, _, body = _answer(s)
    assert status == 413
    s.close()


# ---------------------------------------------------------------------------------------------- item 4
def test_json_strings_are_not_booleans(hub):
    owner = hub.token("acme", "publish")
    acme = hub.client("acme", "publish")
    acme.share("acme/geo", "globex")
    cases = [
        {"ref": "acme/geo", "public": "false"},
        {"ref": "acme/geo", "with": "globex", "revoke": "false"},
        {"ref": "acme/geo", "public": 1},
    ]
    for body in cases:
        r = httpx.post(hub.url + "/api/v1/share", json=body, headers={"authorization": f"Bearer {owner}"})
        assert r.status_code == 422 and r.json()["error"]["kind"] == "invalid", (body, r.text)
    assert hub.get("/api/v1/resolve", params={"ref": "acme/geo@1.0.0"}).status_code == 404  # still private
    assert acme.shared_with("acme/geo") == ["globex"]  # still shared
    acme.yank("acme/geo@1.0.0", reason="test")
    r = httpx.post(
        hub.url + "/api/v1/yank",
        json={"ref": "acme/geo@1.0.0", "undo": "false"},
        headers={"authorization": f"Bearer {owner}"},
    )
    assert r.status_code == 422
    assert acme.resolve("acme/geo@1.0.0").yanked  # still yanked
    acme.yank("acme/geo@1.0.0", undo=True)
    acme.share("acme/geo", "globex", revoke=True)


# ---------------------------------------------------------------------------------------------- item 5
def test_a_token_revoked_mid_upload_publishes_nothing(hub, packs):
    data = packs["late"].read_bytes()
    secret, info = hub.app.state.hub.tokens.create("acme", "publish")
    s = _connect(hub)
    s.sendall(
        _head(
            "PUT", "/api/v1/publish", {"content-length": str(len(data)), "authorization": f"Bearer {secret}"}
        )
    )
    s.sendall(data[: len(data) // 2])
    deadline = time.monotonic() + 5
    while not hub.uploads_left() and time.monotonic() < deadline:  # the upload is under way
        time.sleep(0.02)
    hub.app.state.hub.tokens.revoke(info.id)
    s.sendall(data[len(data) // 2 :])
    status, _, body = _answer(s)
    s.close()
    assert status == 401 and json.loads(body)["error"]["message"] == "invalid or revoked token"
    with pytest.raises(RegistryError) as e:
        hub.client("ops", "admin").resolve("acme/late@1.0.0")
    assert e.value.kind == ErrorKind.NOT_FOUND


def test_uploads_have_a_total_deadline_and_caps(tmp_path, packs):
    data = packs["late"].read_bytes()
    with running_hub(
        tmp_path / "registry", idle_timeout_s=5.0, upload_deadline_s=2.0, uploads_per_token=2, uploads_total=3
    ) as h:
        token = h.token("acme", "publish")
        head = _head(
            "PUT", "/api/v1/publish", {"content-length": str(len(data)), "authorization": f"Bearer {token}"}
        )
        # A trickle (a byte every 0.3 s, well inside the 5 s idle timer) ends at the 2 s deadline.
        s = _connect(h)
        s.sendall(head)
        t0 = time.monotonic()
        s.settimeout(0.3)
        answer = b""
        for i in range(40):
            try:
                s.sendall(data[i : i + 1])
                answer = s.recv(65536)
                if answer:
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        assert b" 422 " in answer.split(b"\r\n", 1)[0] and b"not finished within 2 s" in answer
        assert time.monotonic() - t0 < 4.0
        s.close()
        # Two uploads open for one token: a third is refused (429), another token still gets a slot,
        # and the hub's total (3) refuses a fourth whoever sends it.
        held = []
        for _ in range(2):
            c = _connect(h)
            c.sendall(head + data[:1000])
            held.append(c)
        deadline = time.monotonic() + 5
        while len(h.uploads_left()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = httpx.put(h.url + "/api/v1/publish", content=data, headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 429 and r.json()["error"]["kind"] == "limited"
        assert "retry-after" in r.headers
        other = h.token("acme", "admin")
        c = _connect(h)
        c.sendall(
            _head(
                "PUT",
                "/api/v1/publish",
                {"content-length": str(len(data)), "authorization": f"Bearer {other}"},
            )
        )
        c.sendall(data[:1000])
        held.append(c)
        while len(h.uploads_left()) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        third = h.token("initech", "publish")
        r = httpx.put(h.url + "/api/v1/publish", content=data, headers={"authorization": f"Bearer {third}"})
        assert r.status_code == 429 and "the hub has 3 uploads open" in r.json()["error"]["message"]
        for c in held:
            c.close()


# ---------------------------------------------------------------------------------------------- item 7
def test_no_anonymous_500s(hub, caplog):
    for params in ({"limit": "²"}, {"limit": "١٢"}, {"offset": "1e3"}):
        r = hub.get("/api/v1/search", params=params)
        assert r.status_code == 422 and r.json()["error"]["kind"] == "invalid", r.text
        assert r.headers["content-security-policy"].startswith("default-src 'none'")
    token = hub.token("acme", "publish")
    deep = b"[" * 40000 + b"]" * 40000
    for body in (deep, b'{"ref": ' + deep[:60000] + b"}", b"not json", b"[]"):
        r = httpx.post(
            hub.url + "/api/v1/yank",
            content=body[:65000],
            headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
        )
        assert r.status_code == 422 and r.json()["error"]["kind"] == "invalid", r.text
        assert r.headers["x-content-type-options"] == "nosniff"


def test_a_crash_is_one_log_line_and_a_json_500_with_the_security_headers(tmp_path, caplog):
    with running_hub(tmp_path / "registry") as h:
        state = h.app.state.hub

        def broken(namespace):  # a fault below the hub (a fault injected: nothing real fails on demand)
            raise RuntimeError("disk on fire")

        state.versions = broken
        with caplog.at_level(logging.ERROR, logger="adapterhub.hub"):
            r = h.get("/api/v1/versions")
        assert r.status_code == 500
        assert r.json()["error"] == {
            "kind": "internal",
            "message": "the hub failed to answer this request",
            "hint": None,
        }
        assert "disk on fire" not in r.text and "Traceback" not in r.text
        assert r.headers["content-security-policy"].startswith("default-src 'none'")
        lines = [rec for rec in caplog.records if rec.name == "adapterhub.hub"]
        assert (
            len(lines) == 1 and lines[0].exc_info is None and "RuntimeError: disk on fire" in lines[0].message
        )


# ---------------------------------------------------------------------------------------------- items 6, 8
@contextmanager
def _statements(hub):
    """Count the SQL statements the registry's index runs meanwhile."""
    engine = hub.app.state.hub.registry.index.db.engine
    seen: list[str] = []

    def count(conn, cursor, statement, *args):
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)


def test_statements_do_not_grow_with_hidden_rows(hub, packs):
    token = hub.token("globex", "read")
    initech = hub.client("initech", "publish")

    def cost() -> dict[str, int]:
        out = {}
        for path in ("/api/v1/versions", "/api/v1/namespaces"):
            with _statements(hub) as seen:
                assert hub.get(path, token=token).status_code == 200
            out[path] = len(seen)
        return out

    for i in range(2):
        initech.publish(packs[f"hidden{i}"])
    few = cost()
    for i in range(2, 12):
        initech.publish(packs[f"hidden{i}"])
    many = cost()
    assert many == few, (few, many)
    # and the hidden rows stay hidden
    assert not any(p.namespace == "initech" for p in hub.client("globex", "read").versions())


def test_missing_and_private_adapters_cost_the_same(hub):
    for token in (None, hub.token("globex", "read")):
        counts = []
        for ref in ("acme/geo@1.0.0", "acme/nothing@1.0.0", "acme/geo", "acme/nothing"):
            with _statements(hub) as seen:
                r = hub.get("/api/v1/resolve", params={"ref": ref}, token=token)
            assert r.status_code == 404
            counts.append([s.split(" FROM ")[-1][:60] for s in seen])
        assert counts[0] == counts[1] and counts[2] == counts[3], counts


# ---------------------------------------------------------------------------------------------- item 9
def test_who_else_may_read_is_asked_only_by_the_namespace_itself(hub):
    acme = hub.client("acme", "publish")
    acme.share("acme/geo", "globex")
    acme.share("acme/geo", "initech")
    try:
        globex = hub.token("globex", "read")
        r = hub.get("/api/v1/can-read", params={"namespace": "initech", "ref": "acme/geo"}, token=globex)
        assert r.status_code == 403 and r.json()["error"]["kind"] == "forbidden"
        r = hub.get("/api/v1/readable", params={"namespace": "initech"}, token=globex)
        assert r.status_code == 403
        assert hub.get("/api/v1/readable", params={"namespace": "initech"}).status_code == 401
        own = hub.get("/api/v1/can-read", params={"namespace": "globex", "ref": "acme/geo"}, token=globex)
        assert own.json() == {"readable": True}
        admin = hub.token("ops", "admin")
        asked = hub.get("/api/v1/can-read", params={"namespace": "initech", "ref": "acme/geo"}, token=admin)
        assert asked.json() == {"readable": True}
        assert hub.get("/api/v1/shared-with", params={"ref": "acme/geo"}, token=globex).json() == []
    finally:
        acme.share("acme/geo", "globex", revoke=True)
        acme.share("acme/geo", "initech", revoke=True)


# ---------------------------------------------------------------------------------------------- item 10
@contextmanager
def _hostile_hub(rows: list[dict]):
    """A server that answers every search with `rows` (what a hostile hub, or anything on a plain-http
    path, could send)."""
    import uvicorn
    from hub_fixtures import free_port
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def search(request):
        return JSONResponse(rows, headers={"x-total-count": str(len(rows))})

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(Starlette(routes=[Route("/api/v1/search", search)]), port=port, log_level="error")
    )
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(5)


def test_the_cli_shows_nothing_raw_from_a_hub(hub, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app as cli_app

    good = hub.client("globex", "read").versions("globex")[0].to_dict()
    evil_name = {**good, "name": "x\x1b]0;pwned\x07\x1b[2J", "ref": "globex/x\x1b]0;pwned\x07\x1b[2J@1.0.0"}
    evil_base = {**good, "base_name": "base\x1b[2J\u202e"}
    monkeypatch.delenv("ADAPTERHUB_TOKEN", raising=False)
    runner = CliRunner()
    with _hostile_hub([evil_name]) as url:
        out = runner.invoke(cli_app, ["search", "--registry", url])
    assert out.exit_code == 65 and "malformed version row" in out.output
    assert "\x1b" not in out.output and "\x07" not in out.output
    with _hostile_hub([evil_base]) as url:
        out = runner.invoke(cli_app, ["search", "--registry", url])
    assert out.exit_code == 0 and "\\x1b[2J" in out.output and "\\u202e" in out.output
    assert "\x1b" not in out.output and "\u202e" not in out.output


# ---------------------------------------------------------------------------------------------- item 11
def test_a_login_token_belongs_to_its_hub_and_never_crosses_plain_http(hub, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from adapterhub_lite.registry.credentials import load_token, token_path
    from adapterhub_lite.registry.remote import RemoteRegistry
    from cli.main import app as cli_app

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("ADAPTERHUB_TOKEN", raising=False)
    monkeypatch.delenv("ADAPTERHUB_REGISTRY", raising=False)
    runner = CliRunner()
    token = hub.token("acme", "read")
    # A token made for every hub (what login wrote before): sent to none.
    token_path().parent.mkdir(parents=True)
    token_path().write_text(json.dumps({"default": token}))
    assert load_token(hub.url) is None and load_token("https://elsewhere.example") is None
    assert runner.invoke(cli_app, ["login", "--token", token]).exit_code == 65  # which hub?
    bad = runner.invoke(cli_app, ["login", "--token", "ahub_nothing_here", "--hub", hub.url])
    assert bad.exit_code == 77
    ok = runner.invoke(cli_app, ["login", "--token", token, "--hub", hub.url + "/"])
    assert ok.exit_code == 0 and "acme" in ok.output
    assert load_token(hub.url) == token
    assert load_token(hub.url.replace("127.0.0.1", "127.0.0.3")) is None
    assert load_token("https://elsewhere.example") is None
    # Plain http to another machine: no token leaves unless the user says the path is trusted.
    with pytest.raises(RegistryError, match="over plain http") as e:
        RemoteRegistry("http://192.0.2.10:8000", token=token)
    assert e.value.kind == ErrorKind.INVALID
    RemoteRegistry("http://192.0.2.10:8000", token="").close()  # anonymous: nothing to leak
    RemoteRegistry("https://192.0.2.10", token=token).close()
    monkeypatch.setenv("ADAPTERHUB_ALLOW_HTTP_TOKEN", "1")
    RemoteRegistry("http://192.0.2.10:8000", token=token).close()


# ---------------------------------------------------------------------------------------------- item 13
def test_smaller_holes(hub, packs):
    # The Host header is not reflected into the page's commands, nor into a redirect.
    page = hub.get("/globex/bot", headers={"host": "evil.example"})
    assert page.status_code == 200 and "evil.example" not in page.text
    r = hub.get("/globex/bot/", headers={"host": "evil.example"}, follow_redirects=False)
    assert "evil.example" not in r.headers.get("location", "")
    # A bad size in a tar header is the archive's fault, not the Content-Length's.
    from adapterhub_lite.bundles.archive import canonical_header

    block = bytearray(canonical_header("adapter_model.safetensors", 10))
    block[124:136] = b"\x80" + b"\xff" * 11  # base-256 size field: about 2**88 bytes
    body = bytes(block) + b"\0" * 1024
    r = httpx.put(
        hub.url + "/api/v1/publish",
        content=body,
        headers={"authorization": f"Bearer {hub.token('acme', 'publish')}"},
    )
    assert r.status_code == 422 and "Content-Length" not in r.json()["error"]["message"], r.text
    # A public adapter with every version yanked: the same answer with and without a token.
    globex = hub.client("globex", "publish")
    globex.yank("globex/bot@1.0.0")
    try:
        anon = hub.get("/globex/bot")
        with_token = hub.get("/globex/bot", token=hub.token("acme", "read"))
        assert anon.status_code == with_token.status_code == 200
        assert hub.get("/api/v1/resolve", params={"ref": "globex/bot"}).status_code == 404
        assert (
            hub.get(
                "/api/v1/resolve", params={"ref": "globex/bot"}, token=hub.token("acme", "read")
            ).status_code
            == 404
        )
    finally:
        globex.yank("globex/bot@1.0.0", undo=True)


def test_private_weights_and_the_index_are_not_readable_by_other_local_users(hub):
    registry = hub.app.state.hub.registry
    for folder in (hub.registry_dir, Path(registry.blobs.root), registry.index.db.path.parent, hub.state_dir):
        assert folder.stat().st_mode & 0o077 == 0, (folder, oct(folder.stat().st_mode))


def test_an_anonymous_search_never_answers_from_before_a_privacy_change(tmp_path, packs):
    from adapterhub_lite.registry import open_registry

    with running_hub(tmp_path / "registry") as h:
        globex = h.client("globex", "publish")
        globex.publish(packs["bot"])
        globex.set_public("globex/bot")
        assert [d["ref"] for d in h.get("/api/v1/search", params={"q": "bot"}).json()] == ["globex/bot@1.0.0"]
        open_registry(tmp_path / "registry").set_public("globex/bot", False)  # behind the hub's back
        assert h.get("/api/v1/search", params={"q": "bot"}).json() == []  # the very next answer


def test_hub_serve_off_loopback_says_what_it_risks():
    from adapterhub_lite.hub import exposure_warning

    assert exposure_warning("127.0.0.1") is None and exposure_warning("::1") is None
    assert exposure_warning("localhost") is None
    warning = exposure_warning("0.0.0.0")
    assert warning and "clear text" in warning and "TLS" in warning


@pytest.mark.slow
def test_hub_cli_says_what_to_do_next(tmp_path):
    """Issue 28: `hub serve` suggests the next step, `hub tokens` has a header row."""
    from typer.testing import CliRunner

    from cli.main import app as cli_app

    with served_hub(tmp_path / "registry", "--public-url", "https://hub.example") as (_, proc):
        pass
    said = proc.stderr.read()
    assert "next: make a publish token with `adapterhub hub token NAMESPACE --scope publish`" in said
    assert "--registry https://hub.example" in said and "warning" not in said  # loopback: nothing to warn
    runner = CliRunner()
    reg = str(tmp_path / "registry")
    assert runner.invoke(cli_app, ["hub", "token", "acme", "--registry", reg, "--note", "ci"]).exit_code == 0
    listed = runner.invoke(cli_app, ["hub", "tokens", "--registry", reg]).output.splitlines()
    assert listed[0].split() == ["ID", "NAMESPACE", "SCOPE", "CREATED", "STATE", "NOTE"]
    assert listed[1].split()[1:3] == ["acme", "read"] and listed[1].split()[-2:] == ["active", "ci"]
