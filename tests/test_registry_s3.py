"""The registry's blobs on an S3-compatible object store: a real `moto` server on loopback, through s3fs.

S3 has no rename: s3fs's `mv` is a copy then a delete, so "a blob appears only whole, under its hash"
rests on the temp object being complete and checked before the copy. These tests read the bucket with
a client of their own (boto3), not through the registry's filesystem object, so s3fs's listing cache
cannot make a missing or partial object look right.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from needs import require_module

from adapterhub_lite.bundles import pack_bundle, verify_bundle
from adapterhub_lite.registry import faults, open_registry

BUCKET = "adapterhub-blobs"
pytestmark = pytest.mark.slow  # starts a server, as the PostgreSQL cases do


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory) -> Iterator[str]:
    """A moto S3 server in a process of its own on a free loopback port; its endpoint URL."""
    require_module("moto.server", "pip install 'moto[server]' (in the dev extras)")
    require_module("s3fs", "pip install s3fs (in the dev extras)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # listening?
            assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto's S3 server did not listen within 60 s"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket; the AWS variables pointing s3fs (and boto3) at the loopback server; a boto3
    client of the test's own."""
    import boto3
    import s3fs

    for name, value in {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    client = boto3.client("s3", endpoint_url=s3_server)
    for bucket in client.list_buckets().get("Buckets", []):
        for obj in client.list_objects_v2(Bucket=bucket["Name"]).get("Contents", []):
            client.delete_object(Bucket=bucket["Name"], Key=obj["Key"])
        client.delete_bucket(Bucket=bucket["Name"])
    client.create_bucket(Bucket=BUCKET)
    yield client
    s3fs.S3FileSystem.clear_instance_cache()


def _keys(client, prefix: str = "") -> list[str]:
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return sorted(obj["Key"] for obj in listed)


@pytest.fixture(scope="module")
def two_versions(lora_dir, tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3-bundles")
    return [
        pack_bundle(lora_dir, root / v, namespace="acme", name="bot", version=v, base_dir=tiny_base,
                    vllm_check=False)
        for v in ("1.0.0", "1.1.0")
    ]


def test_publish_and_pull_through_a_real_s3_server(s3, two_versions, tmp_path):
    """Published to `s3://…`: every object in the bucket is a whole blob under its own sha256 and no
    temp object is left (the copy-then-delete rename finished); a second registry opened afresh (a new
    s3fs client, no cache) pulls both versions bit for bit; the URL is remembered; `check --deep` is
    clean."""
    import s3fs

    url = f"s3://{BUCKET}/registry"
    reg = open_registry(tmp_path / "registry", blobs=url)
    published = [reg.publish(b) for b in two_versions]
    keys = _keys(s3)
    assert keys and all(k.startswith("registry/sha256/") for k in keys), keys  # nothing under tmp/
    for key in keys:
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        sha = key.rsplit("/", 1)[-1]
        assert hashlib.sha256(body).hexdigest() == sha and key == f"registry/sha256/{sha[:2]}/{sha}"
    # A reader elsewhere: a new registry object and a new s3fs client (read-after-write across clients).
    s3fs.S3FileSystem.clear_instance_cache()
    again = open_registry(tmp_path / "registry")
    assert again.blobs.url == url
    for p in published:
        dest = again.pull(p.ref, tmp_path / "pulled" / p.ref.replace("/", "_"), vllm_check=False)
        assert verify_bundle(dest, vllm_check=False).digest == p.digest
    report = again.check(deep=True)
    assert report.ok and not report.stale_temp_files and not report.orphaned_blobs, report


def test_a_blob_is_visible_only_whole_and_a_crashed_upload_is_repaired(s3, two_versions, tmp_path):
    """While a blob is written only its temp object exists (never the key readers look up); a write
    interrupted after the temp was written leaves no blob; a temp object an upload left behind is kept
    by `check --repair` while younger than the grace period (it may be a publish in progress: its age
    is read from S3's LastModified) and removed once older."""
    reg = open_registry(tmp_path / "registry", blobs=f"s3://{BUCKET}/registry")
    seen: dict[str, list[str]] = {}

    def hook(step: str) -> None:
        seen.setdefault(step, _keys(s3))

    faults.hook = hook
    try:
        reg.publish(two_versions[0])
    finally:
        faults.hook = None
    while_written = seen["blob-temp-written"]
    assert [k for k in while_written if k.startswith("registry/tmp/")], while_written
    assert not [k for k in while_written if k.startswith("registry/sha256/")], while_written  # first blob
    assert [k for k in seen["blob-stored"] if k.startswith("registry/sha256/")], seen["blob-stored"]

    class Crash(Exception):
        pass

    def crash(step: str) -> None:
        if step == "blob-temp-written":
            raise Crash(step)

    before = _keys(s3)
    faults.hook = crash
    try:
        with pytest.raises(Crash):
            reg.publish(two_versions[1])
    finally:
        faults.hook = None
    assert _keys(s3) == before  # no blob of the interrupted write, and its temp object removed

    s3.put_object(Bucket=BUCKET, Key="registry/tmp/left-by-a-killed-upload", Body=b"partial")
    kept = reg.check(repair=True)  # the default grace period: an hour
    assert kept.kept_recent == [f"{BUCKET}/registry/tmp/left-by-a-killed-upload"], kept
    assert "registry/tmp/left-by-a-killed-upload" in _keys(s3)
    removed = reg.check(repair=True, grace_s=0)
    assert removed.removed == [f"{BUCKET}/registry/tmp/left-by-a-killed-upload"], removed
    assert not _keys(s3, "registry/tmp/")

