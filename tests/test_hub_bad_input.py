"""Hostile and broken requests to a real hub: one test each; nothing half-visible, nothing left behind."""

from __future__ import annotations

import io
import socket
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from hub_fixtures import running_hub

from adapterhub_lite.bundles import pack_bundle
from adapterhub_lite.errors import ErrorKind, RegistryError

MAX_UPLOAD = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def archives(lora_dir, tiny_base, tmp_path_factory) -> dict[str, Path]:
    import bundle_fixtures as fx

    root = tmp_path_factory.mktemp("hub-bad")
    other = fx.make_adapter(tiny_base, root / "other-adapter", seed=11)
    return {
        "good": pack_bundle(
            lora_dir,
            root / "good.tar",
            namespace="acme",
            name="good",
            version="1.0.0",
            base_dir=tiny_base,
            archive=True,
            vllm_check=False,
        ),
        "race-a": pack_bundle(
            lora_dir,
            root / "ra.tar",
            namespace="acme",
            name="race",
            version="1.0.0",
            base_dir=tiny_base,
            archive=True,
            vllm_check=False,
        ),
        "race-b": pack_bundle(
            other,
            root / "rb.tar",
            namespace="acme",
            name="race",
            version="1.0.0",
            base_dir=tiny_base,
            archive=True,
            vllm_check=False,
        ),
        "globex": pack_bundle(
            lora_dir,
            root / "globex.tar",
            namespace="globex",
            name="x",
            version="1.0.0",
            base_dir=tiny_base,
            archive=True,
            vllm_check=False,
        ),
    }


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with running_hub(
        tmp_path_factory.mktemp("hub-bad") / "registry", max_upload=MAX_UPLOAD, idle_timeout_s=3.0
    ) as h:
        yield h


def _put(hub, body: bytes, token: str, **headers) -> httpx.Response:
    return httpx.put(
        hub.url + "/api/v1/publish",
        content=body,
        timeout=60,
        headers={"authorization": f"Bearer {token}", **headers},
    )


def _nothing_published(hub) -> bool:
    """Nothing but the race test's winner was ever published on this hub."""
    return {p.ref for p in hub.client("ops", "admin").versions()} <= {"acme/race@1.0.0"}


def _wait_no_uploads(hub, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while hub.uploads_left() and time.monotonic() < deadline:
        time.sleep(0.05)
    return hub.uploads_left()


def test_oversized_upload_is_refused_and_leaves_nothing(hub, tmp_path):
    r = _put(hub, b"\0" * (MAX_UPLOAD + 1), hub.token("acme", "publish"))
    assert r.status_code == 422 and "over this hub's limit" in r.json()["error"]["message"]

    # Without a Content-Length (chunked), the limit holds while streaming: an archive whose first
    # entry claims more bytes than the limit is unpacked until the limit, then refused.
    from adapterhub_lite.bundles.archive import canonical_header

    def chunks():
        yield canonical_header("adapter_model.safetensors", 64 * MAX_UPLOAD)
        for _ in range(MAX_UPLOAD // 65536 + 2):
            yield b"\0" * 65536

    r = _put(hub, chunks(), hub.token("acme", "publish"))
    assert r.status_code == 422 and "over this hub's limit" in r.json()["error"]["message"]
    # The client reads the hub's early refusal (sent before the body was taken) as the error it is.
    big = tmp_path / "big.tar"
    big.write_bytes(b"\0" * (MAX_UPLOAD + 1))
    with pytest.raises(RegistryError, match="over this hub's limit") as e:
        hub.client("acme", "publish").publish(big)
    assert e.value.kind == ErrorKind.INVALID
    assert _wait_no_uploads(hub) == [] and _nothing_published(hub)


def test_truncated_archive_is_refused(hub, archives):
    data = archives["good"].read_bytes()
    r = _put(hub, data[: len(data) - 3000], hub.token("acme", "publish"))
    assert r.status_code == 422
    assert r.json()["error"]["message"].startswith("upload: truncated archive")
    assert _wait_no_uploads(hub) == [] and _nothing_published(hub)


def _tar(entries: list[tarfile.TarInfo], payload: bytes = b"x") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for info in entries:
            if info.isreg():
                info.size = len(payload)
                t.addfile(info, io.BytesIO(payload))
            else:
                t.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: [tarfile.TarInfo("../evil")], "escapes the bundle"),
        (lambda: [tarfile.TarInfo("/etc/passwd")], "absolute path"),
        (lambda: [_sym("manifest.json", "/etc/passwd")], "symlink"),
        (lambda: [tarfile.TarInfo(f"f{i:03d}") for i in range(40)], "entries"),
    ],
    ids=["dotdot", "absolute", "symlink", "too-many"],
)
def test_hostile_archives_are_refused_before_anything_is_written(hub, make, words):
    r = _put(hub, _tar(make()), hub.token("acme", "publish"))
    assert r.status_code == 422, r.text
    assert words in r.json()["error"]["message"]
    assert _wait_no_uploads(hub) == [] and _nothing_published(hub)


def _sym(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def test_token_of_another_namespace_cannot_publish(hub, archives):
    r = _put(hub, archives["globex"].read_bytes(), hub.token("acme", "publish"))
    assert r.status_code == 403
    assert r.json()["error"]["message"] == "a token of namespace 'acme' cannot change 'globex'"
    assert _wait_no_uploads(hub) == [] and _nothing_published(hub)


def test_revoked_token_is_refused(hub, archives):
    secret, info = hub.app.state.hub.tokens.create("acme", "publish")
    assert hub.get("/api/v1/whoami", token=secret).json()["namespace"] == "acme"
    hub.app.state.hub.tokens.revoke(info.id)
    r = _put(hub, archives["good"].read_bytes(), secret)
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid or revoked token"
    assert hub.get("/api/v1/whoami", token=secret).status_code == 401
    assert _nothing_published(hub)


@pytest.mark.parametrize(
    "ref",
    [
        "acme/../etc@1.0.0",
        "../../x/y@1.0.0",
        "acme/ge\x1bo@1.0.0",
        "acme/geo\x00@1.0.0",
        "\u0430cme/geo@1.0.0",  # Cyrillic а, looks like the Latin a of acme
        "acme/ge\u200bo@1.0.0",
    ],  # zero-width space
    ids=["dotdot-name", "dotdot-namespace", "escape", "nul", "cyrillic", "zero-width"],
)
def test_names_with_dotdot_controls_or_lookalikes_are_refused(hub, ref):
    r = hub.get("/api/v1/resolve", params={"ref": ref}, token=hub.token("ops", "admin"))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["kind"] == "invalid"
    with pytest.raises(RegistryError) as e:
        hub.client("acme", "read").resolve(ref)
    assert e.value.kind == ErrorKind.INVALID


def test_two_concurrent_publishes_of_one_version_exactly_one_wins(hub, archives):
    token = hub.token("acme", "publish")
    barrier = threading.Barrier(2)
    results: dict[str, httpx.Response] = {}

    def go(key: str) -> None:
        data = archives[key].read_bytes()
        barrier.wait()
        results[key] = _put(hub, data, token)

    threads = [threading.Thread(target=go, args=(k,)) for k in ("race-a", "race-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [k for k, r in results.items() if r.status_code == 201]
    assert len(winners) == 1, {k: r.text for k, r in results.items()}
    winner = winners[0]
    loser = next(r for k, r in results.items() if k != winner)
    assert loser.status_code == 409 and "versions are immutable" in loser.json()["error"]["message"]
    stored = hub.client("acme", "read").resolve("acme/race@1.0.0")
    assert stored.digest == results[winner].json()["digest"]
    assert _wait_no_uploads(hub) == []


def test_client_disconnecting_mid_upload_leaves_nothing(hub, archives):
    data = archives["good"].read_bytes()
    host, port = hub.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            f"PUT /api/v1/publish HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len(data)}\r\n"
            f"authorization: Bearer {hub.token('acme', 'publish')}\r\n\r\n".encode()
        )
        s.sendall(data[: len(data) // 2])
        deadline = time.monotonic() + 5
        while not hub.uploads_left() and time.monotonic() < deadline:  # the upload is under way
            time.sleep(0.02)
        assert hub.uploads_left()
    assert _wait_no_uploads(hub) == []
    with pytest.raises(RegistryError):
        hub.client("acme", "read").resolve("acme/good@1.0.0")


def test_stalled_upload_times_out(hub, archives):
    data = archives["good"].read_bytes()
    host, port = hub.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            f"PUT /api/v1/publish HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len(data)}\r\n"
            f"authorization: Bearer {hub.token('acme', 'publish')}\r\n\r\n".encode()
        )
        s.sendall(data[:1000])
        s.settimeout(20)
        answer = s.recv(4096).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 422") and "upload stalled" in answer
    assert _wait_no_uploads(hub) == [] and _nothing_published(hub)


@pytest.mark.parametrize("piece", [1, 511, 513, 65536, 10**9])
def test_streamed_archive_unpacks_the_same_in_any_pieces(bundles_for_unpack, tmp_path, piece):
    """The upload's streaming reader gives the files and hashes the archive holds, however the bytes
    arrive, and refuses what `scan_archive` refuses (bytes after the end marker, truncation, padding)."""
    import hashlib

    from adapterhub_lite.bundles.archive import scan_archive
    from adapterhub_lite.errors import BundleError
    from adapterhub_lite.hub.unpack import StreamUnpacker

    archive = bundles_for_unpack
    data = archive.read_bytes()

    def unpack(blob: bytes, dest):
        u = StreamUnpacker(dest)
        try:
            for i in range(0, len(blob), piece):
                u.feed(blob[i : i + piece])
            return u.finish()
        finally:
            u.abort()

    done = unpack(data, tmp_path / "ok")
    names = [e.name for e in scan_archive(archive)]
    assert sorted(done.sha256) == names
    for name in names:
        body = (tmp_path / "ok" / name).read_bytes()
        assert hashlib.sha256(body).hexdigest() == done.sha256[name]
    assert done.weights_values is not None and not isinstance(done.weights_values, BundleError)
    for bad, what in (
        (data + b"\0" * 512 + b"x", "after the end-of-archive marker"),
        (data[:-700], "truncated archive"),
        (data[:-1024], "truncated archive"),
    ):
        with pytest.raises(BundleError, match=what):
            unpack(bad, tmp_path / f"bad{len(bad)}")
    first = scan_archive(archive)[0]
    pad_at = first.offset + first.size
    if first.size % 512:
        broken = data[:pad_at] + b"x" + data[pad_at + 1 :]
        with pytest.raises(BundleError, match="non-zero padding"):
            unpack(broken, tmp_path / "pad")


@pytest.fixture(scope="module")
def bundles_for_unpack(lora_dir, tiny_base, tmp_path_factory):
    from adapterhub_lite.bundles import pack_bundle

    return pack_bundle(
        lora_dir,
        tmp_path_factory.mktemp("unpack") / "b.tar",
        namespace="acme",
        name="unpack",
        version="1.0.0",
        base_dir=tiny_base,
        archive=True,
        vllm_check=False,
    )


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_non_finite_weights_are_refused_by_hub_publish_and_by_pull(value, lora_dir, tiny_base, tmp_path):
    """The value scan rides along the upload and the download now: both still refuse NaN/Inf weights."""
    import bundle_fixtures as fx
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from adapterhub_lite.bundles.archive import write_archive
    from adapterhub_lite.bundles.verify import check_bundle
    from adapterhub_lite.registry.publish import store_verified

    bundle = pack_bundle(
        lora_dir,
        tmp_path / "b",
        namespace="acme",
        name="nan",
        version="1.0.0",
        base_dir=tiny_base,
        vllm_check=False,
    )
    good = check_bundle(bundle, vllm_check=False).manifest
    tensors = load_file(str(bundle / "adapter_model.safetensors"))
    name = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = value
    poisoned = tmp_path / "w.safetensors"
    save_file(tensors, str(poisoned))
    fx.reseal(bundle, {"adapter_model.safetensors": poisoned.read_bytes()})
    archive = write_archive(bundle, sorted(p.name for p in bundle.iterdir()), tmp_path / "nan.tar")
    assert not np.isfinite(value)

    with running_hub(tmp_path / "registry") as h:
        with pytest.raises(RegistryError, match="non-finite") as e:
            h.client("acme", "publish").publish(archive)
        assert e.value.kind == ErrorKind.INVALID
        assert h.client("ops", "admin").versions() == [] and h.uploads_left() == []
        # Planted behind the checks (a registry written by hand): the client refuses it on pull.
        from adapterhub_lite.bundles.manifest import parse_manifest

        manifest = parse_manifest((bundle / "manifest.json").read_bytes(), "manifest.json")
        assert manifest.digest != good.digest
        store_verified(h.app.state.hub.registry, bundle, manifest)
        with pytest.raises(RegistryError, match="non-finite") as e:
            h.client("ops", "admin").pull("acme/nan@1.0.0", tmp_path / "pulled")
        assert e.value.kind == ErrorKind.INVALID
        assert not (tmp_path / "pulled").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pulled")]


def test_download_intake_scans_values_and_check_bundle_trusts_only_matching_hashes(lora_dir, tmp_path):
    """What a pull establishes while downloading (hash, value scan) is what check_bundle then uses:
    a non-finite value found on the way is refused, and a hash that is not the manifest's is refused."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from adapterhub_lite.bundles.values import ValueReport
    from adapterhub_lite.errors import BundleError
    from adapterhub_lite.registry.intake import FileIntake

    tensors = load_file(str(lora_dir / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key] = tensors[key].copy()
    tensors[key].flat[-1] = np.inf
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    for src, expect in ((lora_dir / "adapter_model.safetensors", ValueReport), (bad, BundleError)):
        data = src.read_bytes()
        intake = FileIntake(tmp_path / "out", len(data), "dl:weights", scan_values=True)
        for i in range(0, len(data), 7777):  # pieces that split the header and the values
            intake.write(data[i : i + 7777])
        sha, values = intake.finish()
        assert sha == __import__("hashlib").sha256(data).hexdigest()
        assert (tmp_path / "out").read_bytes() == data
        assert isinstance(values, expect)
    assert "non-finite" in values.message


def test_check_bundle_refuses_a_precomputed_hash_that_is_not_the_manifests(archives, tmp_path):
    from adapterhub_lite.bundles.archive import extract_archive
    from adapterhub_lite.bundles.values import ValueReport
    from adapterhub_lite.bundles.verify import Precomputed, check_bundle
    from adapterhub_lite.errors import BundleError

    d = extract_archive(archives["good"], tmp_path / "b")
    ok = check_bundle(d, vllm_check=False).manifest
    hashes = {f.path: f.sha256 for f in ok.files}
    assert (
        check_bundle(d, vllm_check=False, precomputed=Precomputed(hashes, ValueReport())).digest == ok.digest
    )
    for name in hashes:
        wrong = {**hashes, name: "0" * 64}
        with pytest.raises(BundleError, match=f"{name}: sha256 does not match"):
            check_bundle(d, vllm_check=False, precomputed=Precomputed(wrong, ValueReport()))
