"""The bounded disk cache: the pure eviction planner, the sweep over a real DiskCacheStore,
and a real server whose folder stays under max_size while a hit keeps streaming."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from resizer.cache.base import EntryMeta
from resizer.cache.disk import DiskCacheStore
from resizer.cache.eviction import (
    AUTO_FRACTION,
    LOW_WATER,
    SWEEP_LOCK,
    Candidate,
    Sweeper,
    plan_sweep,
)
from resizer.config import load_config
from resizer.errors import ConfigError
from resizer.metrics import Metrics
from resizer.options import TransformOptions, key_digest
from resizer.transform.fake import FakeTransformer, fake_output
from resizer.units import MiB
from tests.server import server_config_text, start_server
from tests.test_cache_memory import START, FakeClock, put, sample_bytes
from tests.test_http_coalescing import poll_until

# --- the planner (pure) --------------------------------------------------------------------

candidates = st.lists(
    st.builds(
        Candidate,
        digest=st.text("0123456789abcdef", min_size=4, max_size=4),
        size=st.integers(0, 1000),
        last_use=st.integers(0, 100).map(float),
        expires=st.integers(0, 100).map(float),
        in_use=st.booleans(),
    ),
    max_size=30,
    unique_by=lambda c: c.digest,
)


@settings(max_examples=300, deadline=None)
@given(
    entries=candidates,
    now=st.integers(0, 100).map(float),
    max_size=st.integers(0, 20_000),
    pinned=st.integers(0, 3000),
    low_fraction=st.floats(0.0, 1.0),
)
def test_plan_removes_expired_then_least_recently_used_down_to_the_low_watermark(
    entries: list[Candidate], now: float, max_size: int, pinned: int, low_fraction: float
) -> None:
    """Expired go, then LRU down to the low mark: never in use, never too many, oldest first."""
    low_water = int(max_size * low_fraction)
    plan = plan_sweep(entries, now=now, max_size=max_size, low_water=low_water, pinned=pinned)
    # (With retention 0 nothing expired is kept; the retention is tested below.)
    removed = plan.expired + plan.evicted
    assert len({c.digest for c in removed}) == len(removed)
    assert not any(c.in_use for c in removed)
    assert {c.digest for c in plan.expired} == {
        c.digest for c in entries if c.expires <= now and not c.in_use
    }
    survivors = [c for c in entries if c not in removed]
    assert plan.total_after == pinned + sum(c.size for c in survivors)
    before_size = pinned + sum(c.size for c in entries if c not in plan.expired)
    if before_size <= max_size:
        assert plan.evicted == []
    else:
        removable_left = [c for c in survivors if not c.in_use]
        assert plan.total_after <= low_water or not removable_left
        if plan.evicted:  # minimal: without the last one it would still be above the mark
            assert plan.total_after + plan.evicted[-1].size > low_water
        for evicted in plan.evicted:
            assert all(evicted.last_use <= c.last_use for c in removable_left)
    uses = [c.last_use for c in plan.evicted]
    assert uses == sorted(uses)


def test_expired_entries_are_kept_for_the_retention_and_evicted_first() -> None:
    """Within the retention an expired entry stays (revalidation refreshes it); beyond it,
    it goes; over max_size, retained expired entries go before fresh ones used long ago."""
    fresh_old = Candidate("aa", size=100, last_use=0.0, expires=1_000.0)
    retained = Candidate("bb", size=100, last_use=50.0, expires=90.0)
    gone = Candidate("cc", size=100, last_use=60.0, expires=10.0)
    roomy = plan_sweep(
        [fresh_old, retained, gone], now=100.0, max_size=1_000, low_water=900, retention=50.0
    )
    assert (roomy.expired, roomy.evicted) == ([gone], [])
    tight = plan_sweep(
        [fresh_old, retained, gone], now=100.0, max_size=150, low_water=100, retention=50.0
    )
    assert (tight.expired, tight.evicted) == ([gone], [retained])


def test_plan_keeps_entries_in_use_even_when_it_cannot_reach_the_mark() -> None:
    """Entries in use stay, expired or not, whatever the size."""
    busy = Candidate("aa", size=500, last_use=0.0, expires=0.0, in_use=True)
    old = Candidate("bb", size=500, last_use=1.0, expires=50.0)
    plan = plan_sweep([busy, old], now=10.0, max_size=100, low_water=90)
    assert plan.expired == []
    assert plan.evicted == [old]
    assert plan.total_after == 500


# --- the sweep over a real store -----------------------------------------------------------

ENTRY = 1000  # bytes of each test entry's data


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def new_store(root: Path, clock: FakeClock) -> DiskCacheStore:
    store = DiskCacheStore(root, clock=clock)
    store.prepare()
    return store


@pytest.fixture
def store(root: Path, clock: FakeClock) -> DiskCacheStore:
    return new_store(root, clock)


def folder_bytes(root: Path) -> int:
    """What the bound covers: every file under entries/, and partial data in tmp/."""
    total = sum(p.stat().st_size for p in (root / "entries").rglob("*") if p.is_file())
    return total + sum(p.stat().st_size for p in (root / "tmp").glob("*.data"))


def data_file(store: DiskCacheStore, entry: EntryMeta) -> Path:
    path = store.data_path(entry)
    assert path is not None
    return path


def set_last_use(store: DiskCacheStore, entry: EntryMeta, when: float) -> None:
    """Make ``entry`` look last used (and published) at unix time ``when``."""
    os.utime(data_file(store, entry), (when, when))


async def fill(store: DiskCacheStore, count: int, ttl: float = 3600.0) -> list[EntryMeta]:
    """``count`` entries, the i-th last used i seconds after an hour ago (0 is the oldest)."""
    entries = []
    base = time.time() - 3600
    for index in range(count):
        entry = await put(store, f"key-{index}", sample_bytes(ENTRY, seed=index), ttl=ttl)
        set_last_use(store, entry, base + index)
        entries.append(entry)
    return entries


def present(store: DiskCacheStore, entries: list[EntryMeta]) -> list[int]:
    """Indexes of the entries whose metadata is still published."""
    return [
        index
        for index, entry in enumerate(entries)
        if (data_file(store, entry).parent / f"{key_digest(entry.key)}.meta.json").exists()
    ]


async def test_sweep_evicts_least_recently_used_first_and_hits_keep_entries(
    store: DiskCacheStore,
) -> None:
    """Over max_size the sweep evicts least recently used first to 90 %; hit entries survive."""
    store.touch_interval = 0.0
    entries = await fill(store, 12)
    assert await store.lookup("key-0") is not None  # marks entry 0 used now
    assert store.recall("key-0") is not None
    store._next_touch.clear()
    assert store.recall("key-1") is None  # not remembered: lookup first
    assert await store.lookup("key-1") is not None
    assert store.recall("key-1") is not None  # touching the data kept the metadata identity
    one = folder_bytes(store.root) // 12
    max_size = 8 * one
    metrics = Metrics()
    sweeper = Sweeper(store, max_size=max_size, metrics=metrics)
    result = sweeper.sweep_sync()
    assert result is not None
    assert folder_bytes(store.root) <= LOW_WATER * max_size
    assert result.total == folder_bytes(store.root)
    survivors = present(store, entries)
    assert survivors[:2] == [0, 1]
    assert survivors[2:] == list(range(12 - len(survivors) + 2, 12))  # the newest others
    assert result.removed == {"expired": 0, "size": 12 - len(survivors)}
    assert metrics.cache_bytes._value.get() == result.size
    assert metrics.cache_entries._value.get() == len(survivors)
    assert metrics.cache_evictions.labels("size")._value.get() == 12 - len(survivors)
    assert store.recall("key-0") is not None
    for index in set(range(12)) - set(survivors):
        assert await store.lookup(f"key-{index}") is None
        assert not data_file(store, entries[index]).exists()


async def test_expired_entries_go_first_even_under_max_size(
    store: DiskCacheStore, clock: FakeClock
) -> None:
    """Expired entries go (reason expired) even under max_size; fresh old-used ones stay."""
    short = [await put(store, f"short-{i}", sample_bytes(ENTRY, i), ttl=10.0) for i in range(3)]
    long = await fill(store, 3)
    for entry in short:
        set_last_use(store, entry, START)  # recently used: expiry wins over recency
    clock.now = START + 60.0
    metrics = Metrics()
    result = Sweeper(store, max_size=100 * MiB, metrics=metrics).sweep_sync()
    assert result is not None
    assert result.removed == {"expired": 3, "size": 0}
    assert present(store, short) == []
    assert present(store, long) == [0, 1, 2]
    assert metrics.cache_evictions.labels("expired")._value.get() == 3


async def test_an_entry_being_read_is_read_to_its_end_after_eviction(
    store: DiskCacheStore,
) -> None:
    """A reader that opened the data file reads it intact to its end after its eviction."""
    data = sample_bytes(300_000, seed=9)
    streamed = await put(store, "streamed", data)
    others = await fill(store, 3)
    received = []
    async with store.open_range(streamed, 0, streamed.size, 64 * 1024) as chunks:
        received.append(await chunks.__anext__())
        # After the read (which may set the atime itself): make it the least recently used.
        set_last_use(store, streamed, time.time() - 7200)
        result = Sweeper(store, max_size=10_000).sweep_sync()
        assert result is not None
        assert result.removed["size"] == 1
        assert not data_file(store, streamed).exists()
        received.extend([chunk async for chunk in chunks])
    assert b"".join(received) == data
    assert await store.lookup("streamed") is None
    assert present(store, others) == [0, 1, 2]


async def test_entries_whose_lease_is_held_are_skipped(store: DiskCacheStore) -> None:
    """An entry whose lease is held is in use: the next least recently used goes instead."""
    entries = await fill(store, 4)
    lease = store.leases.claim(key_digest(entries[0].key))
    assert lease is not None
    try:
        result = Sweeper(store, max_size=folder_bytes(store.root) - 1).sweep_sync()
    finally:
        lease.release()
    assert result is not None
    assert result.skipped == 1
    assert present(store, entries) == [0, 2, 3]


async def test_an_entry_republished_after_the_scan_is_not_removed(
    store: DiskCacheStore,
) -> None:
    """Removal compares metadata with the scan's: a version republished in between stays."""
    await put(store, "key", sample_bytes(ENTRY, seed=1))
    sweeper = Sweeper(store, max_size=1)
    seen, _ = sweeper._scan()
    (digest,) = seen
    newer = await put(store, "key", sample_bytes(ENTRY, seed=2))
    assert sweeper._remove(digest, seen[digest].raw) == "busy"
    assert await store.lookup("key") == newer
    assert (
        sweeper._remove(
            digest, data_file(store, newer).with_name(f"{digest}.meta.json").read_bytes()
        )
        == "removed"
    )
    assert await store.lookup("key") is None
    assert sweeper._remove(digest, b"") == "gone"


async def test_partial_files_count_but_are_never_touched(store: DiskCacheStore) -> None:
    """Bytes being written in tmp/ count against max_size; the partial itself stays."""
    entries = await fill(store, 4)
    max_size = folder_bytes(store.root) - 1  # without the partial, one eviction would do
    async with store.open_writer("partial", content_type="x", ttl=60, options="") as writer:
        await writer.write(sample_bytes(3 * ENTRY, seed=5))
        result = Sweeper(store, max_size=max_size).sweep_sync()
        assert result is not None
        assert result.pinned == 3 * ENTRY
        assert writer.partial_path.exists()
        assert result.removed["size"] == 3
        await writer.commit()
    assert present(store, entries) == [3]
    assert await store.lookup("partial") is not None


async def test_two_stores_on_one_folder_never_sweep_at_once(root: Path, clock: FakeClock) -> None:
    """Two stores on one folder: one sweeps while the other skips; sweeps never overlap."""
    first, second = new_store(root, clock), new_store(root, clock)
    await fill(first, 6)
    one, two = Sweeper(first, max_size=4 * ENTRY), Sweeper(second, max_size=4 * ENTRY)
    inside = threading.Event()
    release = threading.Event()
    scan = one._scan

    def slow_scan() -> Any:
        inside.set()
        assert release.wait(5)
        return scan()

    one._scan = slow_scan  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(one.sweep)
        await trio.to_thread.run_sync(inside.wait, 5.0)
        assert await two.sweep() is None
        assert (root / SWEEP_LOCK).exists()
        release.set()
    assert await two.sweep() is not None

    active = 0
    most = 0
    guard = threading.Lock()

    def counting(original: Callable[[], Any]) -> Callable[[], Any]:
        def scan() -> Any:
            nonlocal active, most
            with guard:
                active += 1
                most = max(most, active)
            try:
                time.sleep(0.01)  # a worker thread: keep the lock a while
                return original()
            finally:
                with guard:
                    active -= 1

        return scan

    one._scan, two._scan = counting(scan), counting(two._scan)  # type: ignore[method-assign]
    outcomes: list[object] = []

    async def sweep(sweeper: Sweeper) -> None:
        outcomes.append(await sweeper.sweep())

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(sweep, one)
            nursery.start_soon(sweep, two)
    assert most == 1
    assert any(outcome is None for outcome in outcomes)
    assert any(outcome is not None for outcome in outcomes)


async def test_a_commit_over_max_size_starts_a_sweep_soon(store: DiskCacheStore) -> None:
    """serve() sweeps at start and as soon as commits pass max_size, long before its interval."""
    metrics = Metrics()
    sweeper = Sweeper(store, max_size=8 * ENTRY, interval=3600.0, metrics=metrics)
    store.on_publish = sweeper.committed
    async with trio.open_nursery() as nursery:
        await nursery.start(sweeper.serve)
        with trio.fail_after(5):
            await poll_until(lambda: sweeper.sweeps == 1)  # the start-up sweep
            await fill(store, 12)
            await poll_until(lambda: folder_bytes(store.root) <= 8 * ENTRY)
        nursery.cancel_scope.cancel()
    assert sweeper.sweeps >= 2
    assert metrics.cache_evictions.labels("size")._value.get() >= 4


async def test_max_size_zero_is_half_of_free_space_plus_the_cache(store: DiskCacheStore) -> None:
    """max_size 0 resolves at the first sweep to AUTO_FRACTION of free + cached bytes."""
    await fill(store, 2)
    sweeper = Sweeper(store)
    result = sweeper.sweep_sync()
    assert result is not None
    stat = os.statvfs(store.root)
    expected = AUTO_FRACTION * (stat.f_bavail * stat.f_frsize + result.total)
    assert abs(sweeper.max_size - expected) < 16 * MiB  # other files may come and go
    assert result.removed == {"expired": 0, "size": 0}


def test_config_takes_max_size_and_sweep_interval(tmp_path: Path) -> None:
    """[cache] max_size and sweep_interval parse with units and reject nonsense."""
    text = server_config_text(tmp_path, tmp_path / "cache")
    config = load_config(text=text, env={})
    assert config.cache.max_size == 0
    assert config.cache.sweep_interval == 30.0
    tuned = text.replace(
        'backend = "disk"', 'backend = "disk"\nmax_size = "2GiB"\nsweep_interval = "5s"'
    )
    config = load_config(text=tuned, env={})
    assert config.cache.max_size == 2 * 1024 * MiB
    assert config.cache.sweep_interval == 5.0
    for bad in ('max_size = "1KiB"', 'sweep_interval = "1ms"'):
        with pytest.raises(ConfigError):
            load_config(text=text.replace('backend = "disk"', f'backend = "disk"\n{bad}'), env={})


# --- a real server --------------------------------------------------------------------------

HIT_SIZE = 300_000
MISS_SIZE = 100_000


@pytest.mark.integration
async def test_server_folder_stays_under_max_size_while_a_hit_keeps_streaming(
    tmp_path: Path,
) -> None:
    """Misses far past max_size keep the folder under it (+1 entry); a streamed hit is intact."""
    media = tmp_path / "media"
    media.mkdir()
    (media / "clip.mp4").write_bytes(b"source" * 1000)
    cache = tmp_path / "cache"
    max_size = 1 * MiB
    text = server_config_text(media, cache).replace(
        'backend = "disk"', f'backend = "disk"\nmax_size = {max_size}\nsweep_interval = "200ms"'
    )
    fake = FakeTransformer(chunk_size=10_000)

    def output(options: TransformOptions) -> bytes:
        return fake_output(options, HIT_SIZE if options.width == 320 else MISS_SIZE)

    fake.output = output
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, load_config(text=text, env={}), fake)
        assert server.service.disk is not None
        server.service.disk.touch_interval = 0.0  # every hit counts (the test runs in ~1 s)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            hot = {"width": "320"}
            expected = (await client.get("/videos/clip.mp4", params=hot)).content
            assert len(expected) == HIT_SIZE
            done = trio.Event()
            bodies: list[tuple[str, bytes]] = []

            async def stream_hits() -> None:
                async with httpx.AsyncClient(base_url=server.url, timeout=30) as hits:
                    while not done.is_set():
                        parts = []
                        async with hits.stream("GET", "/videos/clip.mp4", params=hot) as resp:
                            async for part in resp.aiter_bytes(16 * 1024):
                                parts.append(part)
                                await trio.sleep(0.002)
                            bodies.append((resp.headers["x-cache-status"], b"".join(parts)))

            async with trio.open_nursery() as clients:
                clients.start_soon(stream_hits)
                sizes = []
                for width in range(100, 124):
                    miss = await client.get("/videos/clip.mp4", params={"width": str(width)})
                    assert miss.status_code == 200
                    assert len(miss.content) == MISS_SIZE
                    sizes.append(folder_bytes(cache))
                done.set()
        nursery.cancel_scope.cancel()
    # Slack: what commits while a sweep runs in its thread (here up to two entries, each with
    # its metadata), since misses keep coming.
    assert max(sizes) <= max_size + 2 * (MISS_SIZE + 4096)
    assert len(bodies) >= 2
    assert all(body == expected for _, body in bodies)
    assert {status for status, _ in bodies} == {"HIT"}
    assert fake.started.count(next(o for o in fake.started if o.width == 320)) == 1
    metrics = server.service.metrics
    assert metrics.cache_evictions.labels("size")._value.get() >= 10
