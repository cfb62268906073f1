"""The nginx configuration of docs/how-to/behind-a-tls-proxy.md, run as written in front of a real
`adapterhub hub serve` (Debian's nginx, a self-signed certificate made here): publish and pull through
TLS, and the proxy's limits answer as the page says (slow)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from hub_fixtures import free_port, served_hub

from adapterhub_lite.bundles import pack_bundle

pytestmark = pytest.mark.slow
DOC = Path(__file__).resolve().parents[1] / "docs" / "how-to" / "behind-a-tls-proxy.md"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def _nginx_blocks() -> list[str]:
    return re.findall(r"```nginx\n(.*?)```", DOC.read_text(), flags=re.S)


def _self_signed(out: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    pem, keyfile = out / "hub.pem", out / "hub.key"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    keyfile.chmod(0o600)
    return pem, keyfile


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, lora_dir, tiny_base):
    if NGINX is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is missing (.ci/run installs nginx-light)")
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    root = tmp_path_factory.mktemp("hub-proxy")
    pem, key = _self_signed(root)
    tls_port = free_port()
    public = f"https://127.0.0.1:{tls_port}"
    with served_hub(root / "registry", "--public-url", public, "--per-client", "1024") as (hub_url, _):
        limits, site = _nginx_blocks()
        hub_port = hub_url.rsplit(":", 1)[1]
        site = (
            site.replace("listen 443 ssl;", f"listen 127.0.0.1:{tls_port} ssl;")
            .replace("/etc/ssl/certs/hub.example.com.pem", str(pem))
            .replace("/etc/ssl/private/hub.example.com.key", str(key))
            .replace("http://127.0.0.1:8000", f"http://127.0.0.1:{hub_port}")
        )
        prefix = root / "nginx"
        for d in ("logs", "tmp"):
            (prefix / d).mkdir(parents=True)
        user = "root" if os.geteuid() == 0 else ""
        conf = prefix / "nginx.conf"
        conf.write_text(
            (f"user {user};\n" if user else "")
            + f"worker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/logs/error.log warn;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            f"access_log off;\nclient_body_temp_path {prefix}/tmp/body;\n"
            f"proxy_temp_path {prefix}/tmp/proxy;\n"
            f"{limits}\n{site}\n}}\n"
        )
        proc = subprocess.Popen(
            [
                NGINX,
                "-p",
                str(prefix),
                "-c",
                str(conf),
                "-e",
                str(prefix / "logs" / "error.log"),
                "-g",
                "daemon off;",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"nginx exited: {proc.stderr.read()}")
                try:
                    if httpx.get(public + "/health", verify=str(pem), timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            else:
                raise RuntimeError("nginx did not answer within 20 s")
            bundle = pack_bundle(
                lora_dir,
                root / "geo.tar",
                namespace="acme",
                name="geo",
                version="1.0.0",
                base_dir=tiny_base,
                archive=True,
                vllm_check=False,
            )
            yield {
                "url": public,
                "pem": pem,
                "port": tls_port,
                "registry": root / "registry",
                "bundle": bundle,
            }
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def test_publish_and_pull_through_the_tls_proxy(proxied, tmp_path, monkeypatch):
    from adapterhub_lite.bundles import verify_bundle
    from adapterhub_lite.hub import token_store
    from adapterhub_lite.registry.remote import RemoteRegistry

    monkeypatch.setenv("SSL_CERT_FILE", str(proxied["pem"]))  # the clients trust the test's certificate
    token, _ = token_store(proxied["registry"]).create("acme", "publish")
    hub = RemoteRegistry(proxied["url"], token=token)
    assert hub.publish(proxied["bundle"]).ref == "acme/geo@1.0.0"
    pulled = hub.pull("acme/geo@1.0.0", tmp_path / "geo")
    assert verify_bundle(pulled).ref == "acme/geo@1.0.0"
    page = httpx.get(
        proxied["url"] + "/acme/geo", headers={"authorization": f"Bearer {token}"}, verify=str(proxied["pem"])
    )
    assert page.status_code == 200 and f"--registry {proxied['url']}" in page.text  # --public-url
    assert page.headers["content-security-policy"].startswith("default-src 'none'")


def test_the_proxy_limits_answer_as_documented(proxied):
    import ssl

    pem, port = proxied["pem"], proxied["port"]
    ctx = ssl.create_default_context(cafile=str(pem))

    def tls() -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        return ctx.wrap_socket(raw, server_hostname="127.0.0.1")

    def status_of(request: bytes) -> int:
        with tls() as s:
            s.sendall(request)
            head = s.recv(4096).split(b"\r\n", 1)[0]
        return int(head.split()[1])

    # A body declared over client_max_body_size: 413 before any of it is sent.
    assert status_of(b"PUT /api/v1/publish HTTP/1.1\r\nhost: x\r\ncontent-length: 3000000000\r\n\r\n") == 413
    # A header line over the 8 KiB buffers: refused (nginx answers 400 for it).
    assert status_of(b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 16384 + b"\r\n\r\n") == 400
    # More than 16 connections from one address: the 17th request is refused (503) while 16 are held.
    from adapterhub_lite.hub import token_store

    token, _ = token_store(proxied["registry"]).create("acme", "read")
    slow_body = (  # the hub waits for a body that does not come: each request stays in progress
        f"POST /api/v1/yank HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n"
        "content-type: application/json\r\ncontent-length: 100\r\n\r\n"
    ).encode()
    held = []
    try:
        for _ in range(16):
            s = tls()
            s.sendall(slow_body)
            held.append(s)
        # nginx counts a connection once its request headers are read: wait for that, not a fixed time.
        deadline = time.monotonic() + 10
        while (answer := status_of(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")) != 503:
            assert answer == 200 and time.monotonic() < deadline
    finally:
        for s in held:
            s.close()
    # A client that never finishes its headers is closed after client_header_timeout (10 s).
    with tls() as s:
        s.sendall(b"GET /health HTTP/1.1\r\n")
        t0 = time.monotonic()
        s.settimeout(20)
        try:
            data = s.recv(4096)
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        assert data == b"" or data.startswith(b"HTTP/1.1 408")
        assert 8 < time.monotonic() - t0 < 15
