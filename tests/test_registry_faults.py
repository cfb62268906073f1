"""Publish under faults, with real processes: SIGKILL at each step, and concurrent publishes of a version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import bundle_fixtures as fx
import pytest

from adapterhub_lite.bundles import pack_bundle, verify_bundle
from adapterhub_lite.errors import RegistryError
from adapterhub_lite.registry import open_registry

# A child that publishes, and at the k-th time it reaches `step` writes a marker and waits to be killed
# (or, with step "go", waits for the go-file before entering the index transaction).
CHILD = r"""
import sys, time
from pathlib import Path
from adapterhub_lite.errors import RegistryError
from adapterhub_lite.registry import faults, open_registry

location, bundle, step, k, marker = sys.argv[1:6]
seen = {"n": 0}

def hook(name):
    if name == step:
        seen["n"] += 1
        if seen["n"] == int(k):
            Path(marker).write_text(name)
            if step == "blobs-stored" and len(sys.argv) > 6:
                go = Path(sys.argv[6])
                while not go.exists():
                    time.sleep(0.01)
            else:
                time.sleep(120)

faults.hook = hook
try:
    print(open_registry(location).publish(bundle).digest)
except RegistryError as exc:
    print(exc.message, file=sys.stderr)
    sys.exit(3)
"""


def _child(tmp_path: Path, location: str, bundle: Path, step: str, k: int, marker: Path, *extra: str):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen(
        [sys.executable, str(script), str(location), str(bundle), step, str(k), str(marker), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("child never reached the step")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def bundle(lora_dir, tiny_base, tmp_path_factory) -> Path:
    return pack_bundle(
        lora_dir,
        tmp_path_factory.mktemp("fault") / "b",
        namespace="acme",
        name="bot",
        version="1.0.0",
        base_dir=tiny_base,
        vllm_check=False,
    )


@pytest.fixture
def location(backend, tmp_path, request) -> str:
    """A registry created up front (so the child's first step is the publish itself), on each backend."""
    if backend == "sqlite":
        loc = str(tmp_path / "registry")
        open_registry(loc)
    else:
        loc = request.getfixturevalue("postgres").new_database()
        open_registry(loc, blobs=str(tmp_path / "blobs"))
    return loc


# (step, k, visible after the kill?)  Blobs of the bundle: README, config, weights, then the manifest.
KILL_POINTS = [
    ("publish-start", 1, False),
    ("blob-temp-written", 1, False),  # the first blob's bytes are in a temp file, not yet renamed
    ("blob-stored", 2, False),  # two blobs stored, nothing in the index
    ("blobs-stored", 1, False),  # every blob stored, index untouched
    ("before-commit", 1, False),  # rows inserted inside the transaction, not committed
    ("committed", 1, True),  # transaction committed
]


@pytest.mark.slow
@pytest.mark.parametrize("step,k,visible", KILL_POINTS, ids=[p[0] for p in KILL_POINTS])
def test_sigkill_during_publish_is_all_or_nothing(tmp_path, location, bundle, step, k, visible):
    marker = tmp_path / "reached"
    proc = _child(tmp_path, location, bundle, step, k, marker)
    _wait_for(marker, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    reg = open_registry(location)
    digest = verify_bundle(bundle, vllm_check=False).digest
    if visible:
        assert reg.resolve("acme/bot@1.0.0").digest == digest
        assert (
            verify_bundle(reg.pull("acme/bot", tmp_path / "p", vllm_check=False), vllm_check=False).digest
            == digest
        )
        assert reg.check().ok
        return
    with pytest.raises(RegistryError, match="no acme/bot@1.0.0"):
        reg.resolve("acme/bot@1.0.0")
    assert reg.versions() == [] and reg.search("") == []
    report = reg.check()
    leftovers = report.orphaned_blobs + report.stale_temp_files
    expected = {
        "publish-start": 0,
        "blob-temp-written": 1,
        "blob-stored": 2,
        "blobs-stored": 4,
        "before-commit": 4,
    }[step]
    assert len(leftovers) == expected and report.missing_blobs == []
    assert report.ok == (expected == 0)
    # A fresh leftover is spared by the default grace period (a publish may still be running) ...
    assert reg.check(repair=True).removed == []
    # ... and removed when it is old enough.
    repaired = reg.check(repair=True, grace_s=0)
    assert sorted(repaired.removed) == sorted(leftovers)
    assert reg.check().ok
    # The registry is usable: publishing again works and the result is whole.
    assert reg.publish(bundle).digest == digest
    assert reg.check(deep=True).ok


@pytest.mark.slow
def test_concurrent_publishes_of_one_version_have_one_winner(tmp_path, location, bundle, tiny_base):
    other = fx.make_adapter(tiny_base, tmp_path / "other", seed=3)
    rival = pack_bundle(
        other,
        tmp_path / "rival",
        namespace="acme",
        name="bot",
        version="1.0.0",
        base_dir=tiny_base,
        vllm_check=False,
    )
    digests = {verify_bundle(b, vllm_check=False).digest for b in (bundle, rival)}
    assert len(digests) == 2
    go = tmp_path / "go"
    procs, markers = [], []
    for i, b in enumerate((bundle, rival)):
        markers.append(tmp_path / f"ready{i}")
        procs.append(_child(tmp_path, location, b, "blobs-stored", 1, markers[-1], str(go)))
    for proc, marker in zip(procs, markers, strict=True):
        _wait_for(marker, proc)  # both have stored their blobs and passed the early immutability check
    go.write_text("go")
    results = [p.communicate(timeout=60) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 3], results
    winner = next(r[0].strip() for r in results if r[2] == 0)
    loser_err = next(r[1] for r in results if r[2] == 3)
    assert "already published with other content" in loser_err
    reg = open_registry(location)
    assert reg.resolve("acme/bot@1.0.0").digest == winner
    assert [p.version for p in reg.versions()] == ["1.0.0"]
    # The loser's distinct blobs are orphans that check finds and repair removes.
    report = reg.check()
    assert report.missing_blobs == [] and len(report.orphaned_blobs) >= 1
    reg.check(repair=True, grace_s=0)
    assert reg.check(deep=True).ok
    assert (
        verify_bundle(reg.pull("acme/bot@1.0.0", tmp_path / "p", vllm_check=False), vllm_check=False).digest
        == winner
    )


@pytest.mark.slow
def test_concurrent_publishes_of_identical_content_both_succeed(tmp_path, location, bundle):
    go = tmp_path / "go"
    procs = [
        _child(tmp_path, location, bundle, "blobs-stored", 1, tmp_path / f"r{i}", str(go)) for i in range(2)
    ]
    for i, p in enumerate(procs):
        _wait_for(tmp_path / f"r{i}", p)
    go.write_text("go")
    results = [p.communicate(timeout=60) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0], results
    assert len({r[0].strip() for r in results}) == 1
    assert open_registry(location).check(deep=True).ok


def test_blobs_are_fsynced_before_the_version_is_committed(tmp_path, bundle, monkeypatch):
    from adapterhub_lite.registry import blobs as blob_module

    location = tmp_path / "registry"
    reg = open_registry(location)
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        # A blob synced after its version became visible could be lost by a power cut while named.
        assert not open_registry(location).versions(), "fsync after the version was committed"
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(blob_module.os, "fsync", recording_fsync)
    reg.publish(bundle)
    stored = sorted((location / "blobs" / "sha256").glob("*/*"))
    assert stored, "nothing was stored"
    temp_files = [p for p in synced if "/tmp/" in p.removeprefix(str(tmp_path))]
    assert len(temp_files) == len(stored)  # each blob's bytes, before the rename into place
    assert {str(p.parent) for p in stored} <= set(synced)  # and each rename, by its folder
