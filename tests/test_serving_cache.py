"""The disk cache (no server): its bound, downloads in progress, pins, and leases (a folder handed out is
never deleted before it is read)."""

from __future__ import annotations

import random
import threading
import time

import pytest

from adapterhub_lite.errors import ErrorKind, RegistryError
from adapterhub_lite.registry.cache import BundleCache


def _filler(size: int):
    def fill(tmp):
        d = tmp / "b"
        d.mkdir()
        (d / "w").write_bytes(b"x" * size)
        return d

    return fill


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_handed_out_entry_is_not_evicted_until_released(tmp_path):
    """The soak's race, at the cache: a path handed to vLLM (nothing else pins it) is evicted by the
    next download unless it is leased; once released it is evictable again."""
    cache = BundleCache(tmp_path / "c", max_bytes=2500)
    handed = cache.put_leased("sha256:a", _filler(1000), size=1000)  # resolve_lora returned this path
    time.sleep(0.01)
    cache.put("sha256:b", _filler(1000), size=1000)
    time.sleep(0.01)
    cache.put("sha256:c", _filler(1000), size=1000)  # over the bound: b goes (a is the LRU, but leased)
    assert (handed.path / "w").read_bytes() == b"x" * 1000  # what vLLM's worker reads, still there
    assert cache.get("sha256:b") is None and cache.get("sha256:c")
    cache.release(handed)  # vLLM reported the load done
    time.sleep(0.01)
    cache.put("sha256:d", _filler(1000), size=1000)
    assert not handed.path.exists()  # released and least recently used: evicted like any other
    assert cache.get("sha256:c") and cache.get("sha256:d")


def test_acquire_leases_an_existing_entry_and_leases_expire(tmp_path):
    clock = Clock()
    cache = BundleCache(tmp_path / "c", max_bytes=2500, lease_seconds=60, clock=clock)
    assert cache.acquire("sha256:none") is None
    cache.put("sha256:a", _filler(1000), size=1000)
    lease = cache.acquire("sha256:a")
    assert lease is not None and cache.is_leased(lease) and cache.leased() == {"sha256-a"}
    time.sleep(0.01)
    cache.put("sha256:b", _filler(1000), size=1000)
    time.sleep(0.01)
    cache.put("sha256:c", _filler(1000), size=1000)
    assert lease.path.is_dir() and cache.get("sha256:b") is None
    clock.now += 61  # a holder that never reported back: the pin ends by itself
    assert not cache.is_leased(lease) and cache.leased() == set()
    time.sleep(0.01)
    cache.put("sha256:d", _filler(1000), size=1000)
    assert not lease.path.exists()
    cache.release(lease)  # releasing an expired lease is harmless


def test_leases_are_bounded_and_pins_never_push_the_cache_over_its_bound(tmp_path):
    cache = BundleCache(tmp_path / "c", max_bytes=2500, max_leases=2)
    a = cache.put_leased("sha256:a", _filler(1000), size=1000)
    b = cache.put_leased("sha256:b", _filler(1000), size=1000)
    with pytest.raises(RegistryError, match="being handed out") as full:
        cache.acquire("sha256:a")
    assert full.value.kind is ErrorKind.UNAVAILABLE and full.value.retry_after
    # Both entries leased: a third bundle has no room; a clear, retryable refusal, not an overflow.
    with pytest.raises(RegistryError, match="no room in the bundle cache") as no_room:
        cache.put("sha256:c", _filler(1000), size=1000, label="acme/c@1.0.0")
    assert no_room.value.kind is ErrorKind.UNAVAILABLE and no_room.value.retry_after
    assert cache.total_bytes() <= 2500 and cache.get("sha256:c") is None
    cache.release(a)
    cache.put("sha256:c", _filler(1000), size=1000)
    assert cache.get("sha256:c") and cache.get("sha256:a") is None and b.path.is_dir()
    assert cache.total_bytes() <= 2500


def test_remove_spares_an_entry_someone_else_holds(tmp_path):
    cache = BundleCache(tmp_path / "c", max_bytes=10**6)
    mine = cache.put_leased("sha256:a", _filler(10))
    theirs = cache.acquire("sha256:a")
    assert cache.remove("sha256:a", own=mine) is False and theirs.path.is_dir()
    assert not cache.is_leased(mine)
    cache.release(theirs)
    assert cache.remove("sha256:a") is True and cache.get("sha256:a") is None


def test_no_handed_out_folder_vanishes_under_churn(tmp_path):
    """Eight threads take folders (as resolve_lora hands them to vLLM), read them after a while (as
    vLLM's worker does), then release them, over eight bundles in room for three: no read ever fails,
    and the bound holds throughout; a thread that finds no room is refused with "unavailable"."""
    cache = BundleCache(tmp_path / "c", max_bytes=3500)
    digests = [f"sha256:{i}" for i in range(8)]
    failures: list[str] = []
    refused = [0]
    over = [0]
    done = threading.Event()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            digest = rng.choice(digests)
            try:
                lease = cache.acquire(digest) or cache.put_leased(digest, _filler(1000), size=1000)
            except RegistryError as exc:
                assert exc.kind is ErrorKind.UNAVAILABLE
                refused[0] += 1
                continue
            time.sleep(rng.random() * 0.004)
            try:
                assert (lease.path / "w").stat().st_size == 1000
            except (FileNotFoundError, AssertionError) as exc:
                failures.append(repr(exc))
            finally:
                cache.release(lease)

    def sampler() -> None:
        while not done.is_set():
            if cache.total_bytes() > cache.max_bytes:
                over[0] += 1
            time.sleep(0.001)

    watch = threading.Thread(target=sampler)
    watch.start()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watch.join()
    assert failures == [] and over[0] == 0
    assert refused[0] < 8 * 60  # most loads got through
    assert cache.leased() == set()


def test_bundle_cache_is_bounded_and_never_half_written(tmp_path):
    """The bound holds for finished entries; pinned entries (loaded in vLLM) stay."""
    cache = BundleCache(tmp_path / "c", max_bytes=2500)

    def boom(tmp):
        (tmp / "partial").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        cache.put("sha256:bad", boom)
    assert cache.get("sha256:bad") is None and not list((tmp_path / "c").iterdir())
    cache.put("sha256:a", _filler(1000))
    time.sleep(0.01)
    cache.put("sha256:b", _filler(1000), pinned=["sha256:a"])
    time.sleep(0.01)
    cache.put("sha256:c", _filler(1000), pinned=["sha256:a"])  # over budget: b goes, a is pinned
    assert cache.get("sha256:a") and cache.get("sha256:c") and cache.get("sha256:b") is None


def test_bundle_cache_bound_counts_downloads_in_progress(tmp_path):
    cache = BundleCache(tmp_path / "c", max_bytes=3000)
    cache.put("sha256:old", _filler(1000))
    started, release = threading.Event(), threading.Event()

    def slow(tmp):
        started.set()
        release.wait(10)
        return _filler(1500)(tmp)

    t = threading.Thread(target=cache.put, args=("sha256:slow", slow), kwargs={"size": 1500})
    t.start()
    started.wait(10)
    # 1000 finished + 1500 reserved: a third download of 1000 must evict "old" first
    cache.put("sha256:new", _filler(1000), size=1000)
    assert cache.get("sha256:old") is None
    release.set()
    t.join()
    assert cache.total_bytes() <= 3000
    with pytest.raises(RegistryError, match="more than the whole bundle cache") as big:
        cache.put("sha256:huge", _filler(10), size=3001, label="acme/huge@1.0.0")
    assert big.value.kind is ErrorKind.UNAVAILABLE
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".incoming")]


def test_cache_listing_tolerates_concurrent_eviction(tmp_path, monkeypatch):
    from pathlib import Path

    cache = BundleCache(tmp_path / "c", max_bytes=10**9)
    for i in range(5):
        cache.put(f"sha256:{i}", _filler(10))
    real_stat = Path.stat

    def racing_stat(self, *a, **kw):  # another thread evicts each entry just after it is listed
        if self.parent == cache.root and not self.name.startswith("."):
            import shutil

            shutil.rmtree(self, ignore_errors=True)
        return real_stat(self, *a, **kw)

    monkeypatch.setattr(Path, "stat", racing_stat)
    assert cache.entries() == []


def test_bundle_cache_asks_for_pins_when_it_evicts(tmp_path):
    """Entries being verified or loaded are pinned when the eviction runs, not when a download began."""
    cache = BundleCache(tmp_path / "c", max_bytes=2500)
    busy: list[str] = []
    cache.pins = lambda: busy
    cache.put("sha256:a", _filler(1000))
    time.sleep(0.01)
    busy.append("sha256:a")  # "a" is being handed to vLLM now
    cache.put("sha256:b", _filler(1000))
    time.sleep(0.01)
    cache.put("sha256:c", _filler(1000))
    assert cache.get("sha256:a") and cache.get("sha256:c") and cache.get("sha256:b") is None
